"""ddjax: Distilled Decoding of image autoregressive models in JAX/Flax.

Folders by concept:
  ddjax.teacher   LlamaGen's GPT and VQ tokenizer (and the teacher sampler)
  ddjax.mapper    the flow-matching map noise -> tokens and the pair dataset
  ddjax.student   the DD model, its training and its samplers
  ddjax.evaluate  FID / precision / recall
  ddjax.convert   PyTorch <-> ddjax checkpoints
  ddjax.kernels   attention implementations (XLA, cuDNN, Pallas)
"""

__version__ = "0.1.0"

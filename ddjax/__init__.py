"""ddjax: Distilled Decoding of image autoregressive models in JAX/Flax.

Layers, top to bottom (each imports only those below it):
  ddjax.main, ddjax.app   the entry: reads the config once, builds the objects, runs the modes
  ddjax.demo              training of the shipped digits demo teacher
  ddjax.evaluate.report   the DD evaluation stage and report (methods.py: what it compares)
  ddjax.mapper            the flow-matching map, its check, the pair dataset and its writer
  ddjax.student           the DD model, its samplers, losses, trainer and loading
  ddjax.convert           PyTorch <-> ddjax checkpoints
  ddjax.teacher           the Teacher interface (base.py) and the families (llamagen/)
  ddjax.evaluate          FID / precision / recall, feature extractors, LPIPS
  ddjax.kernels, ddjax.utils, ddjax.sharding   attention kernels, checkpoints, optimiser, I/O
"""

__version__ = "0.1.0"

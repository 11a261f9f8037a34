#!/usr/bin/env bash
# Teacher sampling and pair generation on a GPU (e.g. an H200) or TPU host: the CPU benchmarks
# of benchmarks/README.md, unchanged, in one short run (~5-10 min on an H200).
#
#   bash benchmarks/device_sampling.sh                          # ddjax only
#   LLAMAGEN=/path/to/LlamaGen bash benchmarks/device_sampling.sh   # and LlamaGen on cuda beside it
#
# Needs jax for the accelerator (jax[cuda12] or jax[tpu]); with LLAMAGEN, torch with CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
# f32 and bf16, batch 8 and 32, 256 tokens, XLA attention (the default everywhere).
python benchmarks/teacher_sampling.py --batches 8,32 --dtypes float32,bfloat16 --repeats 3 --weight-major off
# The fused attention kernels (cuDNN for bf16 on GPU, Pallas on TPU or for f32 on GPU).
DDJAX_ATTENTION_AUTO=1 python benchmarks/teacher_sampling.py --batches 8,32 --dtypes float32,bfloat16 --repeats 3 --weight-major off
if [[ -n "${LLAMAGEN:-}" ]]; then
  python benchmarks/teacher_sampling.py --compare-llamagen "$LLAMAGEN" --torch-device cuda \
    --batches 8,32 --repeats 3
fi
python benchmarks/pairs.py --tokens 256

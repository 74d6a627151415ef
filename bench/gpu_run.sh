#!/usr/bin/env bash
# One GPU session (device machine: torch + triton + transformers + peft present, no bitsandbytes):
# install carried wheels, convert the default model once, then the engine and training benchmarks.
# Usage there: bash bench/gpu_run.sh engine|quality16|quality64   (results under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 LORAPLEX_CACHE=/tmp/lpcache LORAPLEX_GGUF=${LORAPLEX_GGUF:-/tmp/model.gguf}
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
export PYTHONPATH=/tmp/site
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${1:-engine}" in
  engine)
    python3 bench/engine_cpu.py --device cuda --quantization nf4 --adapter-ops triton --batch 32 --new-tokens 64 \
      --out "$OUT/engine_gpu_nf4_triton.json" 2>&1 | grep -v "it/s\]"
    python3 bench/engine_cpu.py --device cuda --quantization nf4 --adapter-ops torch --batch 32 --new-tokens 64 \
      --out "$OUT/engine_gpu_nf4_torch.json" 2>&1 | grep -v "it/s\]" ;;
  quality16)
    python3 bench/train_quality.py --rank 16 --steps 150 --batch-size 16 --out "$OUT/train_quality_gpu_r16.json" 2>&1 \
      | grep -vE "step/s|it/s" ;;
  quality64)
    python3 bench/train_quality.py --rank 64 --steps 150 --batch-size 16 --out "$OUT/train_quality_gpu_r64.json" 2>&1 \
      | grep -vE "step/s|it/s" ;;
esac

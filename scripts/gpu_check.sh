#!/usr/bin/env bash
# The GPU checks as one prepared command for a lent device machine (the session's `run` tool;
# see docs/benchmarks.md, "GPU paths"). It uses that machine's own python3 (torch, transformers,
# peft, accelerate are there) with this checkout's src/ on PYTHONPATH; packages it lacks travel
# as wheels in .whl/ (bitsandbytes for the QLoRA test, flash_attn for the flash-attention one).
#
#   mkdir -p .whl && .venv/bin/pip download -q --no-deps -d .whl bitsandbytes==0.50.2  # 43 MiB
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Writes gpu.txt, test_gpu.log and prefix_sharing.log under $OUT (or /tmp/gpu-check).
# prefopt-vs-TRL throughput on the GPU is scripts/gpu_bench.sh (its own carry, .whl-bench).
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', \
accelerate.__version__)" | tee -a "$out/gpu.txt"
# 1. The CUDA paths: bf16, autocast references, SDPA/eager/flash, prefix sharing, QLoRA,
#    gradient checkpointing, reference offload (tiny models, about a minute).
timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -rs -q -p no:cacheprovider 2>&1 \
    | tee "$out/test_gpu.log"
# 2. Prefix sharing's speed-up on the GPU (SmolLM2-135M shape, bf16, interleaved).
timeout 180 python3 bench/prefix_sharing.py --device cuda --dtype bfloat16 --reps 10 2>&1 \
    | tee "$out/prefix_sharing.log"

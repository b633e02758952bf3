#!/usr/bin/env bash
# The GPU check, run on a lent accelerator machine (no network there; its python3 holds a
# CUDA torch). Everything else travels with the call, in two git-ignored folders:
#   .whl/       wheels for Python 3.12 (pydantic, optuna, cmaes, sqlalchemy, plotly, the pure
#               dependencies of Ray that the image lacks)
#   .gpucarry/  zoo/ (base + the four task fine-tunes) and the archives scripts/device_prepare.sh
#               writes (Ray and lm-eval, trimmed)
# Two parts, each with its own time limit, results under $OUT:
#   1. a search on a local Ray instance: 2 workers sharing the GPU (gpus_per_worker 0.5),
#      the demo space cut to 40 trials, refine and the export on the GPU;
#   2. scripts/bench_gpu.py on the bench family: device candidates against the device export.
set -u
. scripts/device_setup.sh
mkdir -p results && { [ -e results/zoo/manifest.json ] || cp -r .gpucarry/zoo results/zoo; }
rm -rf results/gpu_check

if [ "${SKIP_SEARCH:-0}" != 1 ]; then
$PY - <<'EOF'
import yaml
s = yaml.safe_load(open("search_spaces/demo.yaml"))
import torch
if torch.cuda.is_available():
    s["resources"] = {"gpus_per_worker": 0.5}
s["budget"] = {"n_trials": 40, "timeout": 150}
s["refine"]["steps"] = 50
yaml.safe_dump(s, open("search_spaces/gpu_check.yaml", "w"), sort_keys=False)
EOF
t1=$(date +%s)
timeout 240 $PY -c "from mergesearch.cli import main; main()" search search_spaces/gpu_check.yaml --workers 2 \
    > "$OUT/search.log" 2>&1
echo "search rc $? in $(( $(date +%s) - t1 )) s"; tail -25 "$OUT/search.log"
$PY - <<'EOF' 2>&1 | tee "$OUT/trials.txt"
import collections, json, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
url = "sqlite:///results/gpu_check/study.db"
ts = [t for n in optuna.get_all_study_names(url) for t in optuna.load_study(study_name=n, storage=url).get_trials(deepcopy=False)]
print("trials", len(ts), dict(collections.Counter(t.state.name for t in ts)))
print("scored_on", dict(collections.Counter(t.user_attrs.get("scored_on") for t in ts)))
print("workers", dict(collections.Counter(t.user_attrs.get("worker") for t in ts)))
for k in ("materialize_s", "eval_s", "refine_s"):
    v = sorted(t.user_attrs[k] for t in ts if isinstance(t.user_attrs.get(k), (int, float)))
    if v:
        print(k, "n", len(v), "median", round(v[len(v) // 2], 4), "max", round(v[-1], 4))
EOF
cp results/gpu_check/scores.json "$OUT/scores.json" 2>/dev/null
fi

if [ "${SKIP_FAMILY:-0}" != 1 ]; then
t2=$(date +%s)
timeout 300 $PY scripts/bench_gpu.py --no-cpu --repeat 3 --cache /tmp/bench_cache \
    --out-json "$OUT/gpu_family.json" 2>&1 | tee "$OUT/family.log" | grep -v "^\s*$"
echo "family rc $? in $(( $(date +%s) - t2 )) s"
fi
echo "total $(( $(date +%s) - t0 )) s"

# Sourced by the device scripts (scripts/device_check.sh, scripts/device_rehearsal.sh) on a
# lent GPU machine: $OUT, the offline environment, and what scripts/device_prepare.sh
# carried (.whl/ wheels for Python 3.12, .gpucarry/*.tar.xz trimmed Ray and lm-eval)
# unpacked into /tmp/site; SKIP_INSTALL=1 reuses /tmp/site on a machine still warm.
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
PY=${PY:-python3}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    for a in .gpucarry/*.tar.xz; do tar xJf "$a" -C /tmp/site || exit 1; done
fi
export PYTHONPATH=/tmp/site:$PWD
echo "installed in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1
$PY -c "import ray, optuna, torch, transformers, lm_eval; print('ray', ray.__version__, 'optuna', optuna.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', getattr(__import__('importlib').import_module('triton'), '__version__', '?') if __import__('importlib').util.find_spec('triton') else 'none', 'cpus', __import__('os').cpu_count())" || exit 1

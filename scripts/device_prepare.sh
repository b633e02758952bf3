#!/usr/bin/env bash
# Prepares, on this machine (no device time), what a GPU run carries: the GPU machine has no
# network, and its image holds torch, triton, transformers, accelerate, peft, safetensors,
# numpy, pandas, pyarrow, scipy, rich, typer and huggingface_hub, but not what the search
# needs beside them. Writes two git-ignored folders in the repository root:
#   .whl/       wheels for CPython 3.12 (the image's python3): lm-eval and its pure
#               dependencies, optuna, cmaes, sqlalchemy, pydantic, datasets, evaluate, ...
#   .gpucarry/  ray.tar.xz: the Ray wheel unpacked without its Java jars, RLlib, Serve,
#               Data, Train, Tune, the dashboard's front end and debug maps (27 MB
#               compressed instead of 79 MB); lm_eval.tar.xz: lm-eval without its
#               bundled task folders (runs there score local task files only)
# A run then names both in `carry` and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
#   for a in .gpucarry/*.tar.xz; do tar xJf $a -C /tmp/site; done; export PYTHONPATH=/tmp/site:$PWD
# (scripts/device_check.sh and scripts/device_rehearsal.sh do). The carry limit is 64 MiB
# with the working tree; the script prints the total.
set -eu
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p .git/info
for d in /.whl/ /.gpucarry/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl .gpucarry && mkdir -p .whl .gpucarry
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --no-deps -d .whl
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# What `mergesearch search` imports that the image lacks, at the versions this project tests with.
WHEELS="optuna==5.1.0 cmaes==0.13.1 alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0
        SQLAlchemy==2.1.9 greenlet pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
        jsonschema jsonschema-specifications referencing rpds-py more-itertools pytablewriter
        DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet tomlkit nltk defusedxml
        plotly==7.1.0"
for w in $WHEELS; do $PIP download -q $PLAT "$w"; done
# sdist-only pure-Python packages lm-eval names: built here into universal wheels
$PIP wheel -q --no-deps -w .whl sqlitedict==2.1.0 rouge_score==0.1.2 word2number==1.1
$PIP download -q $PLAT ray==2.60.0 -d /tmp/ray-wheel
rm -rf /tmp/ray-site && mkdir -p /tmp/ray-site
(cd /tmp/ray-site && python3 -m zipfile -e /tmp/ray-wheel/ray-2.60.0-*.whl .)
rm -rf /tmp/ray-site/ray/jars /tmp/ray-site/ray/rllib /tmp/ray-site/ray/serve /tmp/ray-site/ray/data \
       /tmp/ray-site/ray/train /tmp/ray-site/ray/tune /tmp/ray-site/ray/dashboard/client
find /tmp/ray-site -name '*.map' -delete
XZ_OPT=-6T0 tar cJf .gpucarry/ray.tar.xz -C /tmp/ray-site .
rm -rf /tmp/ray-site /tmp/ray-wheel
$PIP download -q $PLAT lm_eval==0.4.13 -d /tmp/lme-wheel
rm -rf /tmp/lme-site && mkdir -p /tmp/lme-site
(cd /tmp/lme-site && python3 -m zipfile -e /tmp/lme-wheel/lm_eval-0.4.13-*.whl .)
find /tmp/lme-site/lm_eval/tasks -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
XZ_OPT=-6T0 tar cJf .gpucarry/lm_eval.tar.xz -C /tmp/lme-site .
rm -rf /tmp/lme-site /tmp/lme-wheel
du -sh .whl .gpucarry
echo "carry total (with the tracked tree): $(( ($(du -sb .whl | cut -f1) + $(du -sb .gpucarry | cut -f1) + $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)) / 1048576 )) MiB of 64"

#!/usr/bin/env bash
# Install into .venv, make the miniature's pretrained backbone if it is missing (fl-pretrain,
# about 40 s once; reused afterwards), then fine-tune it federatedly on IID and on Nc=1
# clients (K=100, C=0.1, J=4) through Flower's simulation engine, and print the two
# accuracies. Finished runs are skipped when it is started again.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  bash scripts/check_free_disk.sh 7000 "the install (a venv with torch's CUDA build, ~6.4 GB)"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/fl-pretrain
# fl-experiments starts its own local SuperLink (with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1)
# and stops it by PID at the end; it exits non-zero if a run failed.
exec .venv/bin/fl-experiments heterogeneity --quick --settings iid,nc1 --engine flwr \
  --output-dir results/quickstart

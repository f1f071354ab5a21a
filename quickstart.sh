#!/usr/bin/env bash
# Install into .venv and run the quick preset (synthetic data, tiny ViT, CPU) with fl-run,
# which validates the run-config first and exits non-zero when the run failed.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  bash scripts/check_free_disk.sh 7000 "the install (a venv with torch's CUDA build, ~6.4 GB)"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
# fl-run sets FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (else the SuperLink would build
# a fresh environment, torch included, for every run) and num-supernodes from num-clients.
exec .venv/bin/fl-run configs/quick.toml

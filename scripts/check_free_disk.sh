#!/usr/bin/env bash
# Usage: scripts/check_free_disk.sh NEED_MB WHAT
# Exits 1 with one line when the disk of the current folder has less than NEED_MB free,
# so an install fails before pip runs out of space halfway (torch's CUDA build alone is
# about 5.5 GB in a venv).
set -euo pipefail
need_mb=$1
what=$2
free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
if [ "$free_mb" -lt "$need_mb" ]; then
  echo "error: $what needs about $need_mb MB free on the disk of $(pwd); $free_mb MB free" >&2
  exit 1
fi

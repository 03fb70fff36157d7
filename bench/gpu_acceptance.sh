#!/usr/bin/env bash
# GPU acceptance (bench/gpu_acceptance.py): one prepared run on a lent GPU machine; its last stdout line is a
# JSON table of checks, and it exits non-zero when one fails. Needs `make .venv/.installed` (a CUDA torch build
# on the GPU machine; `pip install -e '.[gpu]'` for the fused-kernel rows).
#   bash bench/gpu_acceptance.sh                  # one H100/H200, no network, <= 8 minutes
#   bash bench/gpu_acceptance.sh --cpu --tiny     # the CPU smoke run tests/test_gpu_acceptance.py does (<= 90 s)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/gpu_acceptance.py "$@"

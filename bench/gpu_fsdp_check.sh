#!/usr/bin/env bash
# The launch tests on real GPUs, with nothing patched: FSDP2 through `accelerate launch` with
# tests/cpu_fsdp/fsdp.yaml (2 processes; its test-only CPU wrapper is a no-op on CUDA), DDP through
# torchrun, a cancelled job that saves on SIGTERM and resumes, a failing rank's own error.
# Needs a machine with >= 2 CUDA devices and `make .venv/.installed` done (a CUDA torch build).
#   bash bench/gpu_fsdp_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
n=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
if [ "$n" -lt 2 ]; then
  echo "gpu_fsdp_check: needs at least 2 CUDA devices (found $n)"
  exit 2
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_launch.py \
  -k "two_rank_ddp_and_fsdp or cancelled_job or failing_rank"

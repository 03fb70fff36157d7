#!/usr/bin/env bash
# The fused loss kernel on a real GPU (issue 18): Liger's fused linear cross-entropy against the eager
# reference (loss and gradients of ntp, remit, rho1 in bfloat16 and float32), then bench/loss_memory.py
# with its remit_fused row. Needs one CUDA device, a CUDA torch build and `pip install -e '.[gpu]'`.
#   bash bench/gpu_loss_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY'
import sys
import torch
import torch.nn.functional as F
from flywheel.remit.kernels import Hidden, _liger_problem, objective_parts

if not torch.cuda.is_available() or _liger_problem():
    sys.exit(f"gpu_loss_check: needs CUDA and liger-kernel >= 0.8.2 ({_liger_problem() or 'no CUDA device'})")
print("torch", torch.__version__, torch.cuda.get_device_name(0))
g = torch.Generator(device="cuda").manual_seed(0)
B, T, H, V = 4, 512, 256, 100_352
worst = 0.0
for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
    for objective in ("ntp", "remit", "rho1"):
        out = {}
        for kernel in ("eager", "fused", "chunked"):
            s = (torch.randn(B, T, H, device="cuda", generator=g.manual_seed(1)) * 0.5).to(dtype).requires_grad_()
            w = (torch.randn(V, H, device="cuda", generator=g.manual_seed(2)) * 0.05).to(dtype).requires_grad_()
            t = torch.randint(0, V, (B, T), device="cuda", generator=g.manual_seed(3))
            m = torch.rand(B, T, device="cuda", generator=g.manual_seed(4)) > 0.1
            ref = -torch.rand(B, T, device="cuda", generator=g.manual_seed(5)) * 10
            head = F.linear(s, w) if kernel == "eager" else Hidden(s, w)
            p = objective_parts(kernel, objective, head, t, m, ref_logprobs=ref, rho1_keep=0.7)
            (p.loss_sum / m.sum()).backward()
            out[kernel] = (p.loss_sum.detach().float(), s.grad.float(), w.grad.float())
        for kernel in ("fused", "chunked"):
            errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(out[kernel], out["eager"])]
            worst = max(worst, max(errs)) if dtype == torch.float32 else worst
            ok = max(errs) <= tol
            print(f"{str(dtype):15} {objective:6} {kernel:8} loss/grad_states/grad_weight rel err "
                  + " ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"))
            if not ok:
                sys.exit(1)
print(f"worst float32 relative error {worst:.1e}")
PY
exec .venv/bin/python bench/loss_memory.py

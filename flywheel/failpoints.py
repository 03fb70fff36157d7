"""Crash-test hooks, like etcd's gofail: `failpoint(name)` kills the whole process group when asked to.

The kill-campaign test sets `FLYWHEEL_FAILPOINT=<name>` and reruns a command until it completes,
proving that a SIGKILL at each named point (no cleanup, no exception handlers) loses no finished
work and that the rerun ends like an uninterrupted run. Never set it in production.

Points: `midtrain-checkpoint` and `posttrain-checkpoint` (a Trainer checkpoint was completely
written), `score-reference-chunk` (a chunk of reference log-probs was written).
"""

from __future__ import annotations

import os
import signal

ENV = "FLYWHEEL_FAILPOINT"


def failpoint(name: str) -> None:
    """SIGKILL this process group if FLYWHEEL_FAILPOINT names this point; otherwise one dict lookup."""
    if os.environ.get(ENV) == name:
        os.killpg(os.getpgrp(), signal.SIGKILL)

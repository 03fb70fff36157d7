"""Crash-test hooks, like etcd's gofail: `failpoint(name)` kills the whole process group when asked to.

The kill-campaign test sets `FLYWHEEL_FAILPOINT=<name>` and reruns a command until it completes,
proving that a SIGKILL at each named point (no cleanup, no exception handlers) loses no finished
work and that the rerun ends like an uninterrupted run. Never set it in production.

Points: `midtrain-checkpoint` and `posttrain-checkpoint` (a Trainer checkpoint was completely
written), `score-reference-chunk` (a chunk of reference log-probs was written), `token-shard`
(a token-store shard was renamed into place, before datatrove marked its task complete).
`name:N` fires at the N-th time this process passes the point.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "FLYWHEEL_FAILPOINT"
_passed: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """SIGKILL this process group if FLYWHEEL_FAILPOINT names this point; otherwise one dict lookup."""
    want = os.environ.get(ENV)
    if want is None or not want.startswith(name):
        return
    point, _, nth = want.partition(":")
    if point == name:
        _passed[name] += 1
        if _passed[name] >= int(nth or 1):
            os.killpg(os.getpgrp(), signal.SIGKILL)

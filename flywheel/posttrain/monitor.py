"""GRPO's silent failure made loud: batches whose groups all got equal rewards teach nothing.

GRPO's advantage is a completion's reward minus its group's mean, so a group where every completion scored
the same contributes zero gradient. TRL computes that share per batch (`frac_reward_zero_std`); this
callback records it under our metric name, `posttrain/zero_advantage_groups`, and warns when a whole
logged batch was flat, e.g. a model that never (or always) answers right, or a reward that cannot vary.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("flywheel.posttrain")

ZERO_ADVANTAGE = "posttrain/zero_advantage_groups"


class ZeroAdvantageMonitor(TrainerCallback):
    """Names the flat-group share in the logs and warns on every batch with no learning signal."""

    def __init__(self) -> None:
        self.flat_batches = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        frac = (logs or {}).get("frac_reward_zero_std")
        if frac is None:
            return
        logs[ZERO_ADVANTAGE] = frac  # callbacks after this one (MLflow, progress) see it
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][ZERO_ADVANTAGE] = frac  # the Trainer copied `logs` there before calling us
        if frac >= 1.0:
            self.flat_batches += 1
            log.warning("GRPO step %d: zero advantage: every group's completions got equal rewards, so this "
                        "batch teaches nothing (rewards mean %s); use prompts the model sometimes solves, or "
                        "add a shaped reward such as 'format'", state.global_step, logs.get("reward"))

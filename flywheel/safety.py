"""Training you can leave alone: NaN/inf stops a stage, checkpoints keep pace with the run, SIGTERM saves.

`TrainingSafety` is a mixin for any HF `Trainer` subclass (our `ReMiTTrainer`, TRL's SFT/DPO/GRPO
trainers) that keeps the Trainer's own loop, checkpoint format and resume:

- **Non-finite guard.** Once per optimizer step, after the gradient norm is computed and before the
  optimizer applies the gradients, a NaN/inf loss (any micro-batch of the step) or gradient norm raises
  `NonFiniteError` naming the stage, the step, what was non-finite and the last good checkpoint. The
  weights are also checked before every checkpoint and before a stage publishes its model, so no folder
  with a non-finite weight is ever written.
- **Cadence.** Besides HF's `save_steps`, a checkpoint every `checkpoint_fraction` of the run and at
  least every `checkpoint_minutes` of wall clock.
- **Preemption.** While `train()` runs (main thread only), SIGTERM sets a flag; at the end of the
  current step the trainer saves a checkpoint, stops, and `train()` raises `Preempted` (exit code 143).
  Rerunning the same command resumes from that checkpoint.

Ranks must take the same decisions (a rank that stops alone hangs the others in their next
collective), so the per-step flags are all-reduced in one tiny collective when torch.distributed is up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from flywheel.errors import NonFiniteError, Preempted
from flywheel.failpoints import failpoint

log = logging.getLogger("flywheel.safety")


def fraction_steps(max_steps: int, fraction: float | None) -> int | None:
    """Steps between the checkpoints that `fraction` of a `max_steps` run asks for (None: off)."""
    if not fraction or max_steps <= 0:
        return None
    return max(1, int(fraction * max_steps))


def complete_checkpoints(folder: Path | str) -> list[Path]:
    """The Trainer checkpoints under `folder` that finished writing (trainer_state.json is written last), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [p for _, p in sorted(found)]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


@dataclass
class SafetyState:
    """What the trainer and its callback share: the stage's names and this step's decisions."""

    stage: str = "training"
    lr_field: str | None = None
    restart_from: str = "the base"
    fraction: float | None = None
    minutes: float | None = None
    failpoint: str | None = None
    every: int | None = None  # steps, from `fraction` once max_steps is known
    sigterm: bool = False  # set by the signal handler
    save_now: bool = False  # the agreed decisions of the current step
    stop_now: bool = False
    checked_step: int = -1
    preempted_at: int | None = None
    last_save_time: float = 0.0
    last_saved: str | None = None


class SafetyCallback(TrainerCallback):
    """Turns the agreed per-step decisions into `should_save` / `should_training_stop`; fires the failpoint."""

    def __init__(self, safety: SafetyState):
        self.safety = safety

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.safety.every = fraction_steps(state.max_steps, self.safety.fraction)
        self.safety.last_save_time = time.monotonic()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.safety.checked_step != state.global_step:  # fail loudly rather than train unguarded
            raise RuntimeError("transformers no longer calls Trainer._get_grad_norm before the optimizer step; "
                               "flywheel's non-finite guard (flywheel/safety.py) must move to the new hook")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        s = self.safety
        if s.every and state.global_step % s.every == 0:
            control.should_save = True
        if s.save_now or s.stop_now:
            control.should_save = True
        if s.stop_now:
            control.should_training_stop = True
            s.preempted_at = state.global_step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        s = self.safety
        s.last_save_time = time.monotonic()
        s.last_saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if s.failpoint and state.is_world_process_zero:  # rank 0 has written trainer_state.json, the last file
            failpoint(s.failpoint)


class ProgressLog(TrainerCallback):
    """About ten progress lines per stage through `say` (the Prefect run log, or rank 0's stdout in a job)."""

    def __init__(self, name: str, say: Any):
        self.name, self.say = name, say

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        every = max(1, state.max_steps // 10)
        if logs and "loss" in logs and state.is_world_process_zero and (
                state.global_step % every == 0 or state.global_step == state.max_steps):
            self.say(f"{self.name} step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")


@contextlib.contextmanager
def sigterm_sets_flag(safety: SafetyState) -> Iterator[None]:
    """For the duration of the block, SIGTERM only sets `safety.sigterm`; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; SIGTERM keeps its usual meaning
        return

    def handler(signum: int, frame: Any) -> None:
        safety.sigterm = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class TrainingSafety:
    """Mixin for a `transformers.Trainer` subclass: put it first, `class X(TrainingSafety, Trainer)`.

    Extra keyword arguments: `stage` (names the stage in messages, e.g. "midtrain"), `lr_field` (the
    config field to lower on NaN), `restart_from` (what a run without checkpoints restarts from),
    `checkpoint_fraction`, `checkpoint_minutes`, `failpoint` (a name for `flywheel.failpoints`).
    """

    def __init__(self, *args: Any, stage: str = "training", lr_field: str | None = None,
                 restart_from: str = "the base", checkpoint_fraction: float | None = None,
                 checkpoint_minutes: float | None = None, failpoint: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The Trainer's nan/inf filter syncs the host on every micro-batch (`torch.isnan(loss)`) only to
        # hide a NaN from the logs (it logs a made-up average instead). We turn it off and check ourselves:
        # the loss flag accumulates on the device and is read once per optimizer step, with the grad norm.
        self.args.logging_nan_inf_filter = False
        self.safety = SafetyState(stage, lr_field, restart_from, checkpoint_fraction, checkpoint_minutes, failpoint)
        self._loss_bad: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        self.add_callback(SafetyCallback(self.safety))

    # -- the guard ---------------------------------------------------------------------------------

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss.detach().float())  # on the device: no sync here
        if self._loss_bad is None:
            self._loss_bad, self._bad_loss = bad, loss.detach().float()
        else:
            self._bad_loss = torch.where(bad & ~self._loss_bad, loss.detach().float(), self._bad_loss)
            self._loss_bad = self._loss_bad | bad
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """The Trainer's norm (already computed by clip_grad_norm), checked with this step's flags before the
        optimizer step: one host sync per optimizer step, one tiny all-reduce when several processes run."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        s = self.safety
        device = self.args.device
        norm = torch.as_tensor(grad_norm if grad_norm is not None else 0.0, device=device).detach().float()
        # fp16 loss scaling makes inf gradients normal: the scaler skips such steps itself.
        check_norm = getattr(self.accelerator, "scaler", None) is None
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool, device=device)
        time_due = bool(s.minutes) and time.monotonic() - s.last_save_time >= s.minutes * 60
        host = torch.tensor([float(check_norm), float(s.sigterm), float(time_due)]).to(device, non_blocking=True)
        flags = torch.cat([(~torch.isfinite(norm)).float().reshape(1) * host[:1],
                           loss_bad.to(device).float().reshape(1), host[1:]])
        norm_bad, loss_was_bad, stop, save = (bool(v) for v in _all_reduce_max(flags).tolist())
        step = self.state.global_step + 1
        if loss_was_bad or norm_bad:
            what = (f"the loss was {self._value(self._bad_loss)}" if loss_was_bad
                    else f"the gradient norm was {self._value(norm)}")
            raise NonFiniteError(self._nonfinite_message(what, step))
        self._loss_bad = None
        s.save_now, s.stop_now, s.checked_step = save, stop, self.state.global_step
        return grad_norm

    @staticmethod
    def _value(t: torch.Tensor | None) -> str:
        if t is None:
            return "non-finite on another process"
        v = float(t)
        return str(v) if not math.isfinite(v) else "non-finite on another process"

    def _nonfinite_message(self, what: str, step: int, applied: bool = False) -> str:
        s = self.safety
        good = complete_checkpoints(self.args.output_dir)
        last = str(good[-1]) if good else f"none yet; the run restarts from {s.restart_from}"
        when = "" if applied else "; stopped before the optimizer applied it, so no checkpoint holds it"
        fix = f"lower {s.lr_field} (a new value starts a fresh run) or check the data" if s.lr_field \
            else "lower the learning rate or check the data"
        return f"{s.stage}: {what} at step {step}{when}; last good checkpoint: {last}; {fix}"

    def check_weights_finite(self, what: str = "the weights") -> None:
        """Raise NonFiniteError (on every rank alike) if any floating parameter or buffer holds NaN/inf."""
        model = self.model
        bad = torch.zeros((), dtype=torch.bool, device=self.args.device)
        for t in [*model.parameters(), *model.buffers()]:
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.is_floating_point() and t.numel():
                bad = bad | ~torch.isfinite(t.detach()).all().to(bad.device)
        if bool(_all_reduce_max(bad.float())):
            raise NonFiniteError(self._nonfinite_message(f"{what} hold a non-finite value", self.state.global_step,
                                                         applied=True) + "; refusing to save them")

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.check_weights_finite("the weights to checkpoint")
        super()._save_checkpoint(model, trial)

    # -- preemption --------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `train`, with SIGTERM turned into save-and-stop; raises `Preempted` after such a stop."""
        s = self.safety
        s.sigterm, s.preempted_at = False, None
        with sigterm_sets_flag(s):
            out = super().train(*args, **kwargs)
        # stopped for it (here or on another rank: the stop is agreed, the signal may not have reached this rank
        # yet), or it came after the last step's check: either way the process must end, not publish
        if s.sigterm or s.preempted_at is not None:
            where = s.last_saved or "none (it came before the first step)"
            raise Preempted(f"{s.stage}: stopped by SIGTERM at step {self.state.global_step}; checkpoint saved at "
                            f"{where}; rerun the same command to resume")
        return out

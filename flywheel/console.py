"""A quiet terminal for `flywheel demo | round | run`: one live line per stage, one result line when it ends.

What the libraries print while a stage runs in this process (the HF Trainer's log dicts, TRL's, lm-eval's
and transformers' progress bars and warnings, Python warnings, anything written to fd 1 or 2) goes to the
stage's log file, `home/logs/<name>/round-N/<stage>.log` (a progress bar as one line at its final state, not
every redraw), kept as an artifact (`logs/`) of the stage's MLflow runs. Prefect's console shows errors only;
its run log (what the Prefect UI shows) stays complete.
With `--verbose` nothing is redirected and the terminal shows everything, as without this module.

A stage launched as a job (`launch.kind` torchrun / accelerate) already writes every rank's output to the
job's own log files (flywheel/launch/); its live line shows the last line streamed from rank 0.
Errors still reach the terminal: the files are swapped back before an exception leaves the stage, a failed
stage's line names its log, and Prefect's console keeps its ERROR records (tracebacks of real crashes).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

# Read when Prefect and MLflow configure their logging: Prefect's console handler (its logging.yml, overridable
# by env) shows errors only, MLflow's handler drops "Creating initial MLflow database tables...".
QUIET_ENV = {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR", "MLFLOW_LOGGING_LEVEL": "WARNING"}
WIDE = 120  # columns of output piped or redirected: rich assumed 80 there and wrapped the stage lines and tables


def wide_console(file: IO[str] | None = None, stderr: bool = False) -> Console:
    """A rich Console for what the user reads: on a terminal its width (rich follows it), COLUMNS where set
    (rich reads it), else WIDE columns, as a pipe or a file has no width of its own."""
    console = Console(file=file, stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():
        console.width = WIDE
    return console


class Terminal:
    """Where the stage lines go: the terminal as it was when the command started (fd 1 is borrowed by stages)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.console = wide_console(self.out)
        self.line: StageLine | None = None

    def close(self) -> None:
        self.out.close()


_terminal: Terminal | None = None


@contextmanager
def quiet_terminal(verbose: bool = False) -> Iterator[Terminal]:
    """For one command: stage lines on the terminal, library output into the stage logs (unless `verbose`)."""
    global _terminal
    sys.stdout.flush()
    term = Terminal(verbose)
    restore: list[tuple[logging.Handler | logging.Logger, int]] = []
    env = {k: v for k, v in QUIET_ENV.items() if k not in os.environ} if not verbose else {}
    os.environ.update(env)
    if not verbose:  # and where they configured theirs already (imported earlier in this process)
        for handler in _prefect_console_handlers():
            restore.append((handler, handler.level))
            handler.setLevel(logging.ERROR)
        if "mlflow" in sys.modules:
            restore.append((logging.getLogger("mlflow"), logging.getLogger("mlflow").level))
            logging.getLogger("mlflow").setLevel(logging.WARNING)
    _terminal = term
    try:
        yield term
    finally:
        _terminal = None
        for obj, level in restore:
            obj.setLevel(level)
        for k in env:
            os.environ.pop(k, None)
        term.close()


def _prefect_console_handlers() -> list[logging.Handler]:
    if "prefect.logging.handlers" not in sys.modules:
        return []
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("prefect", "uvicorn", "fastapi"))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]


SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _elapsed(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class StageLine:
    """One stage's live line (rich) and the facts its result line reports."""

    def __init__(self, round_n: int | None, stage: str):
        self.round_n, self.stage = round_n, stage
        self.t0 = time.monotonic()
        self.training: dict[str, dict[str, Any]] = {}  # trainer kind ("" for midtrain) -> step, total, loss
        self.current = ""
        self.message = ""
        self.result: dict[str, Any] | None = None

    @property
    def title(self) -> str:
        return (f"round {self.round_n}  " if self.round_n is not None else "") + f"{self.stage:<16}"

    def train(self, kind: str, step: int, total: int, loss: float | None = None) -> None:
        seen = self.training.setdefault(kind, {"loss": None})
        seen.update(step=step, total=total, **({"loss": loss} if loss is not None else {}))
        self.current = kind

    def say(self, also: Callable[[str], None]) -> Callable[[str], None]:
        """A `say` for a launched stage: the line shows the last message rank 0 printed; `also` still gets it."""

        def both(message: str) -> None:
            also(message)
            self.message = message.strip()[:100]

        return both

    def done(self, result: dict[str, Any]) -> dict[str, Any]:
        self.result = result
        return result

    def detail(self) -> str:
        if self.current in self.training:
            t = self.training[self.current]
            loss = f"  loss {t['loss']:.4f}" if t["loss"] is not None else ""
            return f"{self.current + ' ' if self.current else ''}step {t['step']}/{t['total']}{loss}"
        bar = _newest_progress_bar()
        if bar is not None:
            return bar
        return self.message

    def __rich__(self) -> Text:
        seconds = time.monotonic() - self.t0
        return Text.assemble((SPINNER[int(seconds * 8) % len(SPINNER)] + " ", "green"), (self.title, "bold"),
                             (f"{_elapsed(seconds)}  ", "cyan"), self.detail(), no_wrap=True, overflow="ellipsis")


def _newest_progress_bar() -> str | None:
    """The newest open tqdm bar (lm-eval's requests, datasets' maps) as `description n/total`, if any."""
    if "tqdm" not in sys.modules:
        return None
    from tqdm import tqdm

    with tqdm.get_lock():
        bars = [b for b in getattr(tqdm, "_instances", ()) if not getattr(b, "disable", True)]
    if not bars:
        return None
    bar = max(bars, key=lambda b: b.start_t)
    total = f"/{bar.total}" if bar.total else ""
    return f"{(bar.desc or 'working').rstrip(': ')} {bar.n}{total}"


def tell(say: Callable[..., None]) -> Callable[..., None]:
    """`say` (a Prefect logger's method) for the flow's own news (the round begins, waits for its slot, cleans up
    after a dead trigger): also one line on a quiet terminal, where Prefect's console shows errors only."""

    def both(message: str, *args: Any) -> None:
        say(message, *args)
        if _terminal is not None and not _terminal.verbose:
            _terminal.console.print(message % args if args else message, soft_wrap=True, markup=False,
                                    highlight=False)

    return both


def active_line() -> StageLine | None:
    return _terminal.line if _terminal is not None else None


def trainer_progress(args: Any, state: Any, logs: dict[str, Any] | None = None) -> None:
    """Called by the flows' Trainer callback: the stage line's step, total and loss (rank 0 only)."""
    line = active_line()
    if line is None or not state.is_world_process_zero:
        return
    name = type(args).__name__  # SFTConfig, GRPOConfig, DPOConfig for TRL; midtrain's own arguments otherwise
    kind = name.removesuffix("Config").lower() if name.endswith("Config") else ""
    loss = logs.get("loss") if logs else None
    line.train(kind, state.global_step, state.max_steps, float(loss) if isinstance(loss, int | float) else None)


@contextmanager
def stage_line(round_n: int | None, stage: str, summary: Callable[[StageLine], str] | None = None,
               log: Path | None = None) -> Iterator[StageLine]:
    """The stage's live line while it runs, then its result line (`summary(line)`, or `done` and the time)."""
    term = _terminal
    line = StageLine(round_n, stage)
    if term is None:
        yield line
        return
    live = None
    if not term.verbose:
        live = Live(line, console=term.console, transient=True, refresh_per_second=4,
                    redirect_stdout=False, redirect_stderr=False)  # the stage's own output goes to its log
        live.start()
    term.line = line
    ok = False
    try:
        yield line
        ok = True
    finally:
        term.line = None
        if live is not None:
            live.stop()
        took = f"{time.monotonic() - line.t0:.0f} s"
        if ok:
            text = summary(line) if summary else "done"
            term.console.print(Text.assemble((line.title, "bold"), f"{text}  ({took})"), soft_wrap=True)
        else:
            where = f"; its log: {log}" if log is not None and log.exists() else ""
            term.console.print(Text.assemble((line.title, "bold"), ("failed", "red"), f" after {took}{where}"),
                               soft_wrap=True)


# --- inside a stage: its library output into its log file ------------------------------------------------


def stage_log_path(home: Path, name: str, round_n: int | None, stage: str) -> Path:
    folder = home / "logs" / name / (f"round-{round_n}" if round_n is not None else "")
    return folder / f"{stage.replace('/', '-')}.log"


@contextmanager
def output_to(path: Path, title: str) -> Iterator[None]:
    """Send fd 1 and 2 (print, tqdm, warnings, C libraries) and Python's log records to `path`, appended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    buffered = sys.stdout.line_buffering
    records = logging.StreamHandler(sys.stderr)  # the root logger's records (lm-eval's warnings, Prefect's lines)
    records.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    with open(path, "a") as log:
        log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} {title} =====\n")
        log.flush()
        start = log.tell()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout.reconfigure(line_buffering=True)  # keep the Trainer's lines in order with the log records
    logging.getLogger().addHandler(records)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(records)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout.reconfigure(line_buffering=buffered)
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        keep_last_frames(path, start)


def last_frame(line: bytes) -> bytes:
    """A log line as the terminal showed it in the end: of the frames a carriage return starts (a tqdm bar drawn
    over itself), the last that is not blank (tqdm clears a bar it does not leave with spaces and a '\\r')."""
    if b"\r" not in line:
        return line
    return next((frame for frame in reversed(line.split(b"\r")) if frame.strip()), b"")


def keep_last_frames(path: Path, start: int) -> None:
    """Reduce each line written to the log from byte `start` on to its last frame (see `last_frame`), so a bar
    is one line at its final state, not every redraw. One rename replaces the file; where that fails (a full
    disk), the log stays as written."""
    from flywheel.data.io import publish

    tmp = None
    try:
        data = path.read_bytes()
        if b"\r" not in data[start:]:
            return
        tidy = b"\n".join(last_frame(line) for line in data[start:].split(b"\n"))
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(data[:start] + tidy)
        publish(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def keep_stage_log(cfg: Any, round_n: int, stage: str, path: Path, since_ms: int) -> None:
    """The log as an artifact (`logs/`) of the stage's MLflow runs that started since `since_ms`."""
    from flywheel.tracking.store import STAGE_TAG, open_tracker

    if not path.exists():
        return
    tracker = open_tracker(cfg)
    for run in tracker.stage_runs(round_n):
        if run.info.start_time >= since_ms and run.data.tags.get(STAGE_TAG, "").startswith(stage):
            tracker.log_artifact(run.info.run_id, path, "logs")


def stage_output(name: str) -> Callable:
    """Decorator for a round's stage function `(cfg, plan, ...)`: under a quiet terminal, its output goes to its log.

    The stage is `name`, or `name/<kind>` for a stage with a `kind` argument (evaluate/base, evaluate/post).
    Anywhere else (tests, a launched job's ranks, `--verbose`) the function runs untouched.
    """

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if _terminal is None or _terminal.verbose:
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            cfg, round_n = bound["cfg"], bound["plan"].round
            stage = f"{name}/{bound['kind']}" if "kind" in bound else name
            path = stage_log_path(cfg.home, cfg.name, round_n, stage)
            since = int(time.time() * 1000) - 1000
            try:
                with output_to(path, f"round {round_n} {stage}"):
                    return fn(*args, **kwargs)
            finally:
                keep_stage_log(cfg, round_n, stage, path, since)

        return run

    return wrap


@contextmanager
def quiet_step(home: Path, name: str, step: str) -> Iterator[None]:
    """A step outside the rounds (building the tiny world): its live line, its output into `logs/<name>/<step>.log`."""
    path = stage_log_path(home, name, None, step)
    if _terminal is None or _terminal.verbose:
        yield
        return
    with stage_line(None, step, lambda line: f"log: {path}", log=path), output_to(path, step):
        yield


def stage_summary(cfg: Any, stage: str) -> Callable[[StageLine], str]:
    """The result line of a round's stage, from what it returned and what its trainers reported."""

    def summary(line: StageLine) -> str:
        out = line.result or {}
        trained = ", ".join(f"{(k + ' ') if k else ''}{t['step']}/{t['total']} steps"
                            + (f" loss {t['loss']:.4f}" if t["loss"] is not None else "")
                            for k, t in line.training.items())
        if stage == "score_reference":
            return f"reference log-probs cached ({Path(out['cache']).name})" if out.get("cache") else "nothing to score"
        # a launched job's progress stays in its rank logs: then the result says whether it trained
        done = trained or ("reused" if out.get("reused", True) else "trained")
        if stage == "midtrain":
            return f"{done} → {cfg.name}-base v{out.get('version')}"
        if stage == "posttrain":
            return f"{done} → {cfg.name}-rl v{out.get('version')}"
        if stage.startswith("evaluate"):
            metrics = out.get("metrics") or {}
            metric = cfg.promotion.metric if cfg.promotion.metric in metrics else next(iter(metrics), None)
            return f"{metric} {metrics[metric]:.4f}" if metric else "no metrics"
        if stage == "promote":
            if out.get("awaiting"):
                return (f"awaiting approval of {cfg.name}-rl v{out.get('version')} "
                        f"(the gate recommends {'promote' if out.get('promoted') else 'reject'})")
            if out.get("promoted"):  # the reason follows: the round's verdict line, or the round table's
                return f"promoted {cfg.name}-rl v{out.get('version')}"
            return f"rejected {cfg.name}-rl v{out.get('version')}, kept v{out.get('previous')}"
        return "done"

    return summary

"""MLflow run layout: one experiment per flywheel, a `round-N` parent run per round, a child per stage.

The embedded default is SQLite plus a local artefact root under `home/mlflow`; a team sets
`tracking.uri` (or MLFLOW_TRACKING_URI) to their server and nothing else changes. We talk to
MLflow through an explicit `MlflowClient` (no global active run), so stages running in
Prefect task threads or other workers never step on each other.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig

ROUND_TAG = "flywheel.round"
STAGE_TAG = "flywheel.stage"
SYSTEM_METRICS_SECONDS = 10.0  # how often a training stage's system metrics are sampled
SUMMARY_TAG = "flywheel.summary"
REHEARSAL_TAG = "flywheel.rehearsal"  # on everything `flywheel rehearse` writes: never a real round's
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(cfg: FlywheelConfig) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the embedded SQLite store under home."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{cfg.home / 'mlflow' / 'mlflow.db'}"


def is_embedded(cfg: FlywheelConfig) -> bool:
    return tracking_uri(cfg).startswith("sqlite:///") and not cfg.tracking.uri and not os.environ.get(
        "MLFLOW_TRACKING_URI"
    )


def code_version() -> str:
    """Package version plus the git commit when running from a checkout: which code made an artefact."""
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version('flywheel')}+{commit}" if commit else version("flywheel")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → `section.field` params (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = str(v)[:6000]
    return out


@dataclass
class Tracker:
    """The flywheel's MLflow experiment and the client that writes to it."""

    cfg: FlywheelConfig
    client: Any
    experiment_id: str

    # --- runs ---------------------------------------------------------------------------------

    def _find_run(self, filter_string: str) -> Any | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def marks(self) -> dict[str, str]:
        """Tags every run and model version of this flywheel carries (a rehearsal's mark)."""
        return {REHEARSAL_TAG: "true"} if self.cfg.tracking.rehearsal else {}

    def round_run(self, round_n: int) -> str:
        """The parent run of round N (created once; reruns of the round log into the same run)."""
        found = self._find_run(f"tags.`{ROUND_TAG}` = '{round_n}' and tags.`{STAGE_TAG}` = 'round'")
        if found:
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"round-{round_n}",
                                     tags={ROUND_TAG: str(round_n), STAGE_TAG: "round", **self.marks()})
        return run.info.run_id

    def summary_run(self) -> str:
        """One run per flywheel holding round-level metrics with step=N (MLflow charts them against rounds)."""
        found = self._find_run(f"tags.`{SUMMARY_TAG}` = 'true'")
        if found:
            return found.info.run_id
        return self.client.create_run(self.experiment_id, run_name="flywheel-summary",
                                      tags={SUMMARY_TAG: "true", STAGE_TAG: "summary", **self.marks()}).info.run_id

    @contextmanager
    def stage_run(self, round_n: int, stage: str, params: dict[str, Any] | None = None,
                  system_metrics: bool = False) -> Iterator[str]:
        """A child run of round N for one stage; FINISHED on success, FAILED if the body raises.

        `system_metrics`: MLflow's system metrics (CPU, memory, disk, network; GPUs with pynvml installed)
        sampled every 10 s while the body runs, as `system/...` metrics (the training stages).
        """
        parent = self.round_run(round_n)
        run = self.client.create_run(self.experiment_id, run_name=stage,
                                     tags={ROUND_TAG: str(round_n), STAGE_TAG: stage, PARENT_TAG: parent,
                                           **self.marks()})
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        monitor = self._system_monitor(run_id) if system_metrics else None
        try:
            yield run_id
        except BaseException as exc:
            # a stage that fails fails its round (a rerun's promote finishes it); an interrupt kills both
            status = "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"
            self.client.set_terminated(run_id, status)
            self.client.set_terminated(parent, status)
            raise
        finally:
            if monitor is not None:
                monitor.finish()
        self.client.set_terminated(run_id, "FINISHED")

    def _system_monitor(self, run_id: str) -> Any:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_SECONDS,
                                       tracking_uri=self.client.tracking_uri)
        monitor.start()
        return monitor

    def kill_dead_runs(self) -> list[str]:
        """Stage runs left RUNNING by a process that died (SIGKILL, OOM) become KILLED.

        Called by a trigger that holds the flywheel's round slot: while it holds it, no other
        round of this flywheel runs, so any RUNNING stage run is a dead process's.
        """
        runs = self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                       max_results=1000)
        dead = [r.info.run_id for r in runs
                if ROUND_TAG in r.data.tags and r.data.tags.get(STAGE_TAG) not in ("round", "summary")]
        for run_id in dead:
            self.client.set_terminated(run_id, "KILLED")
        return dead

    def stage_runs(self, round_n: int) -> list[Any]:
        parent = self.round_run(round_n)
        return list(self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'"))

    def round_runs(self) -> dict[int, Any]:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'round'")
        return {int(r.data.tags[ROUND_TAG]): r for r in runs}

    # --- logging ------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_new_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params the run does not hold yet (MLflow params are write-once: a resumed round keeps its first values)."""
        held = self.client.get_run(run_id).data.params
        self.log_params(run_id, {k: v for k, v in flatten(params).items() if k not in held})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_history(self, run_id: str, history: list[dict[str, Any]], prefix: str = "") -> None:
        """A Trainer's log_history as step metrics: the stage's training curves."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"{prefix}{k}", float(v), now, int(h.get("step", 0)))
            for h in history
            for k, v in h.items()
            if k not in ("step", "epoch") and isinstance(v, int | float)
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_dataset(self, run_id: str, path: Path, name: str, fingerprint: str, context: str = "training") -> None:
        """Record a dataset file as a run input with its fingerprint as the digest."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # MLflow warns that local sources are "experimental"
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(path).resolve()))
        ds = MetaDataset(source=source, name=name, digest=fingerprint)
        self.client.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(),
                                                     [InputTag("mlflow.data.context", context)])])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def artifact_uri(self, run_id: str, artifact_path: str) -> str:
        return f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def check_database(uri: str) -> None:
    """Connect once to a PostgreSQL store, briefly: a closed port or a wrong password is one sentence here,
    where MLflow itself retries for about 100 s and then prints a traceback."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import NoSuchModuleError, OperationalError

    from flywheel.errors import FlywheelError, database_error_sentence

    url = make_url(uri)
    shown = url.render_as_string(hide_password=True)
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 10})
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise FlywheelError(f"tracking store {shown}: its database driver is not installed ({exc}); "
                            "pip install psycopg2-binary (or name another driver: postgresql+psycopg://)") from None
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        raise FlywheelError(database_error_sentence(shown, str(exc.orig), url.username, url.host, url.port,
                                                    url.database)) from None
    finally:
        engine.dispose()


def open_tracker(cfg: FlywheelConfig) -> Tracker:
    """Connect to the flywheel's tracking store, creating the experiment (and the embedded store) once."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
        check_database(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(cfg.name)
    if exp is not None:
        return Tracker(cfg, client, exp.experiment_id)
    location = (cfg.home / "mlflow" / "artifacts").resolve().as_uri() if is_embedded(cfg) else None
    try:
        exp_id = client.create_experiment(cfg.name, artifact_location=location)
    except Exception:  # another process created it first
        exp_id = client.get_experiment_by_name(cfg.name).experiment_id
    return Tracker(cfg, client, exp_id)

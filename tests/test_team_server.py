"""The team server for real, on 127.0.0.1: PostgreSQL (Debian's binaries through pytest-postgresql's executor),
an S3 endpoint (moto's standalone server), the MLflow server on both, the Prefect server on Postgres and a
process worker. Rounds are triggered through the Prefect API and run by the worker; both servers restart
between rounds and the flywheel carries on from what Postgres and the bucket hold."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import pytest
import yaml

from flywheel.env import offline_env
from flywheel.tracking.ui import wait_for_server

from .conftest import capability_missing, process_group_gone
from .test_flows import write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "flywheel-pool"
BUCKET = "flywheel-team"
NAME = "team"
ROUND_TIMEOUT = 420  # seconds for one tiny round through the worker (about a minute when idle)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """The offline environment with none of the caller's MLflow, Prefect or AWS settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_")) and k not in ("FLYWHEEL_HOME",)}
    return {**env, **offline_env(), **extra}


def _pg_ctl() -> str | None:
    """Debian keeps pg_ctl in /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return found
    versions = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


def _default_sigint() -> None:
    """Children of a background shell inherit SIGINT as ignored; `prefect worker` turns SIGTERM into SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    with open(log, "a") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint)


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group, SIGKILL what is left after 20 s; assert nothing of it keeps running."""
    if proc is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if not process_group_gone(proc.pid, timeout=5):
        os.killpg(proc.pid, signal.SIGKILL)
        assert process_group_gone(proc.pid, timeout=10), f"process group {proc.pid} ({proc.args[:3]}) survived"


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


# --- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, driver: str = "postgresql", password: str | None = None) -> str:
        return f"{driver}://{self.user}:{password or self.password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str):  # noqa: ANN201 - a psycopg connection
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=database, autocommit=True)


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL from Debian's binaries, password auth on 127.0.0.1, databases mlflow and prefect.

    The server refuses to run as root, so as root (CI) pg_ctl runs as Debian's `postgres` user.
    """
    from psycopg import sql
    from pytest_postgresql.executors import PostgreSQLExecutor

    pg_ctl = _pg_ctl()
    if pg_ctl is None:
        capability_missing("postgres binaries missing: no pg_ctl (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    exe = pg_ctl
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if owner is None or shutil.which("runuser") is None:
            shutil.rmtree(base)
            capability_missing("postgres binaries missing: as root they need the `postgres` user and runuser "
                               "(apt-get install postgresql)")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        wrapper_dir = Path(tempfile.mkdtemp(prefix="flywheel-pgctl-"))
        exe = str(wrapper_dir / "pg_ctl")
        Path(exe).write_text(f'#!/bin/sh\ncd / && exec runuser -u postgres -- {shlex.quote(pg_ctl)} "$@"\n')
        Path(exe).chmod(0o755)
    port = _free_port()
    datadir = base / "data"
    server = PostgreSQLExecutor(executable=exe, host="127.0.0.1", port=port, datadir=str(datadir),
                                unixsocketdir=str(base), logfile=str(base / "postgresql.log"), startparams="-w",
                                dbname="postgres", user="postgres", timeout=60)
    pg = Postgres("127.0.0.1", port, "flywheel", secrets.token_hex(12))
    try:
        server.start()
        import psycopg

        with psycopg.connect(host=pg.host, port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(pg.user),
                                                                          sql.Literal(pg.password)))
            for db in ("mlflow", "prefect"):
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db),
                                                                          sql.Identifier(pg.user)))
        # initdb's trust auth took any password: from here on TCP clients need the right one
        (datadir / "pg_hba.conf").write_text("local all all trust\n"
                                             "host all all 127.0.0.1/32 scram-sha-256\n"
                                             "host all all ::1/128 scram-sha-256\n")
        subprocess.run([exe, "reload", "-D", str(datadir)], check=True, capture_output=True, timeout=60)
        yield pg
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
        if exe != pg_ctl:
            shutil.rmtree(Path(exe).parent, ignore_errors=True)


# --- the team server --------------------------------------------------------------------------


@dataclass
class Team:
    """The servers of one test module, their ports and logs; servers restart on the same ports and databases."""

    pg: Postgres
    folder: Path
    s3_port: int = field(default_factory=_free_port)
    mlflow_port: int = field(default_factory=_free_port)
    prefect_port: int = field(default_factory=_free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    def s3_credentials(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "flywheel-test", "AWS_SECRET_ACCESS_KEY": "flywheel-test-secret",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def s3(self):  # noqa: ANN201 - a boto3 client
        import boto3

        creds = self.s3_credentials()
        return boto3.client("s3", endpoint_url=self.s3_url, region_name=creds["AWS_DEFAULT_REGION"],
                            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start_s3(self) -> None:
        self.procs["s3"] = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                  _clean_env(), self.log("s3"))

    def start_mlflow(self) -> None:
        env = _clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_S3_ENDPOINT_URL=self.s3_url,
                         **self.s3_credentials())
        self.procs["mlflow"] = _start(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
             "--backend-store-uri", self.pg.url("mlflow"), "--artifacts-destination", f"s3://{BUCKET}/mlflow",
             "--serve-artifacts"], env, self.log("mlflow"))

    def start_prefect(self) -> None:
        env = _clean_env(PREFECT_HOME=str(self.folder / "prefect-server"), PREFECT_UI_ENABLED="false",
                         PREFECT_API_DATABASE_CONNECTION_URL=self.pg.url("prefect", "postgresql+asyncpg"))
        self.procs["prefect"] = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                        "--port", str(self.prefect_port)], env, self.log("prefect"))

    def start_worker(self) -> None:
        env = _clean_env(PREFECT_API_URL=self.api, PREFECT_HOME=str(self.folder / "prefect-worker"),
                         PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_RUNNER_POLL_FREQUENCY="2")
        self.procs["worker"] = _start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                                      env, self.log("worker"))

    def wait_s3(self) -> None:
        wait_for_server(f"{self.s3_url}/moto-api/", self.procs["s3"], 60)

    def wait_servers(self) -> None:
        wait_for_server(f"{self.mlflow_url}/health", self.procs["mlflow"], 180)
        wait_for_server(f"{self.api}/health", self.procs["prefect"], 180)

    def stop(self, *names: str) -> None:
        for name in names:
            _stop(self.procs.pop(name, None))

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log\n{_tail(self.log(name))}" for name in ("worker", "mlflow", "prefect"))


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory, request):
    """S3, MLflow and Prefect servers, then the tiny world (built while they start), then a process worker."""
    t = Team(postgres, tmp_path_factory.mktemp("team-server"))
    try:
        t.start_s3()
        t.wait_s3()
        t.s3().create_bucket(Bucket=BUCKET)
        t.start_mlflow()
        t.start_prefect()
        request.getfixturevalue("small_world")  # the world builds here while both servers start
        t.wait_servers()
        t.start_worker()
        yield t
    finally:
        t.stop("worker", "prefect", "mlflow", "s3")


def _team_config(team: Team, path: Path, home: Path) -> Path:
    """The tiny round of the flow tests, tracked on the team's MLflow server; always promoted."""
    write_config(path, home, NAME, tracking={"uri": team.mlflow_url}, promotion={"force": True})
    return path


def _flywheel(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flywheel"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def _run_round(team: Team, config: Path):  # noqa: ANN202 - a Prefect FlowRun
    """Trigger `flywheel-round` through the Prefect API and wait for the worker to finish it."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: team.api}):
        run = run_deployment("flywheel-round/flywheel-round", parameters={"config": str(config)}, timeout=0)
        deadline = time.monotonic() + ROUND_TIMEOUT
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    return run
                assert team.procs["worker"].poll() is None, f"the worker exited\n{team.logs()}"
                assert time.monotonic() < deadline, f"round still {run.state} after {ROUND_TIMEOUT} s\n{team.logs()}"
                time.sleep(2)


@pytest.fixture(scope="module")
def round_zero(team, tmp_path_factory, request):
    """`flywheel deploy` registers the deployments; round 0 is triggered through the API and run by the worker."""
    cfg, _ = request.getfixturevalue("small_world")  # built by `team` (not a parameter: pytest would set up
    # a session fixture before the module's servers, and the world would no longer build while they start)
    config = _team_config(team, tmp_path_factory.mktemp("team-config") / "team.yaml", cfg.home)
    deployed = _flywheel("deploy", str(config), "--work-pool", POOL,
                         env=_clean_env(PREFECT_API_URL=team.api, PREFECT_HOME=str(team.folder / "prefect-cli")))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert deployed.stdout.count("deployment ") == 2, deployed.stdout
    run = _run_round(team, config)
    assert run.state.is_completed(), f"{run.state}\n{team.logs()}"
    return config, run


def _registry_rows(pg: Postgres) -> tuple[dict[str, list[tuple[str, str]]], dict[tuple[str, str], str]]:
    """Versions (name → [(version, source)]) and aliases ((name, alias) → version), read from Postgres itself."""
    with pg.connect("mlflow") as conn:
        versions: dict[str, list[tuple[str, str]]] = {}
        for name, version, source in conn.execute(
                "SELECT name, version, source FROM model_versions ORDER BY name, version").fetchall():
            versions.setdefault(name, []).append((str(version), source))
        aliases = {(name, alias): str(version) for name, alias, version in
                   conn.execute("SELECT name, alias, version FROM registered_model_aliases").fetchall()}
    return versions, aliases


def _bucket_keys(team: Team) -> list[str]:
    pages = team.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_a_round_triggered_through_prefect_runs_on_the_worker_into_postgres_and_the_bucket(
        team, round_zero, tmp_path, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM

    versions, aliases = _registry_rows(team.pg)
    assert {f"{NAME}-base", f"{NAME}-rl"} <= set(versions), versions
    assert aliases[(f"{NAME}-rl", "reference")] == "1" and aliases[(f"{NAME}-rl", "round-0")] == "1", aliases
    rl_source = dict(versions[f"{NAME}-rl"])["1"]
    assert rl_source.startswith("mlflow-artifacts:/"), rl_source  # proxied by the server, not a local path

    keys = _bucket_keys(team)
    checkpoints = [k for k in keys if k.endswith("/checkpoint/model.safetensors")]
    assert len(checkpoints) >= 2, keys  # the round's base and its RL model
    rl_key = "mlflow/" + rl_source.removeprefix("mlflow-artifacts:/").strip("/") + "/model.safetensors"
    assert rl_key in checkpoints, (rl_key, checkpoints)

    # the way a user loads the reference (README), against the team server: models:/ resolves in the registry.
    # Through the environment, which monkeypatch restores: mlflow.set_tracking_uri also exports it, and putting
    # "back" its default (a ./mlruns file store) would send every later test's tracker there.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.mlflow_url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", team.mlflow_url)
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}-rl@reference", dst_path=str(tmp_path))
    in_bucket = team.s3().get_object(Bucket=BUCKET, Key=rl_key)["Body"].read()
    assert (Path(local) / "model.safetensors").read_bytes() == in_bucket
    model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_after_both_servers_restart_the_next_round_continues_the_lineage_from_postgres(team, round_zero):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config, first = round_zero
    team.stop("prefect", "mlflow")
    team.start_mlflow()
    team.start_prefect()
    team.wait_servers()
    with temporary_settings(updates={PREFECT_API_URL: team.api}), get_client(sync_client=True) as client:
        assert client.read_flow_run(first.id).state.is_completed()  # the restarted server read it from Postgres

    second = _run_round(team, config)
    assert second.state.is_completed(), f"{second.state}\n{team.logs()}"
    versions, aliases = _registry_rows(team.pg)
    assert [v for v, _ in versions[f"{NAME}-rl"]] == ["1", "2"], versions
    assert aliases[(f"{NAME}-rl", "reference")] == "2", aliases

    shown = _flywheel("lineage", str(config), env=_clean_env())
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"{NAME}-rl v2 (round 1"), shown.stdout
    assert any(re.match(rf"{NAME}-rl v1 \(round 0", line) for line in lines), shown.stdout
    assert f"guided by {NAME}-rl v1" in shown.stdout, shown.stdout  # round 1's base was ReMiT-guided by round 0


# --- failures of the database: one sentence each, exit code 2 -----------------------------------


def _lineage_against(uri: str, tmp_path: Path, name: str = NAME) -> subprocess.CompletedProcess:
    """`flywheel lineage` on a config whose tracking store is `uri`, given the way credentials should be:
    in MLFLOW_TRACKING_URI, not in the file."""
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump({"name": name, "home": str(tmp_path / "home")}))
    return _flywheel("lineage", str(config), env=_clean_env(MLFLOW_TRACKING_URI=uri), timeout=120)


def _one_sentence(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_an_unreachable_database_is_one_sentence_naming_host_and_port(postgres, tmp_path):
    closed = _free_port()  # bound a moment ago and released: nothing listens there
    t0 = time.monotonic()
    line = _one_sentence(_lineage_against(postgres.url("mlflow").replace(str(postgres.port), str(closed)),
                                          tmp_path))
    assert f"cannot reach the PostgreSQL server at 127.0.0.1:{closed}" in line, line
    assert postgres.password not in line
    assert time.monotonic() - t0 < 60  # not MLflow's ~100 s of retries


def test_a_wrong_database_password_is_one_sentence_naming_the_user_and_hiding_the_password(postgres, tmp_path):
    wrong = "not-the-password"
    line = _one_sentence(_lineage_against(postgres.url("mlflow", password=wrong), tmp_path))
    assert f"refused the password of user '{postgres.user}'" in line, line
    assert wrong not in line and "***" in line, line


def test_a_registry_model_missing_from_the_postgres_store_is_one_sentence(team, postgres, tmp_path):
    # the team fixture has the MLflow server create its tables in this database
    line = _one_sentence(_lineage_against(postgres.url("mlflow"), tmp_path, name="absent"))
    assert "absent-rl: no @reference yet" in line, line
    assert postgres.password not in line

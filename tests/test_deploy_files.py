"""Team-server files cannot run on the offline dev machine: their syntax and wiring are checked here."""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_prefect_yaml_declares_both_deployments_on_a_process_pool():
    doc = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"flywheel-round", "flywheel-scheduled"}
    for d in deps.values():
        module, func = d["entrypoint"].split(":")
        assert (DEPLOY.parent / module).exists() and f"def {func}(" in (DEPLOY.parent / module).read_text()
        assert d["work_pool"]["name"] == "flywheel-pool"
    assert deps["flywheel-scheduled"]["schedules"][0]["cron"].count(" ") == 4


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_docker_compose_has_prefect_mlflow_postgres_and_s3():
    doc = _compose()
    services = doc["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "--backend-store-uri" in mlflow["command"] and "--artifacts-destination s3://" in mlflow["command"]
    assert "--serve-artifacts" in mlflow["command"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    for name in ("mlflow", "prefect-worker"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).exists(), build
    # the prefect database the server needs is created when the postgres volume is first initialised
    init = [m for m in services["postgres"]["volumes"] if m.endswith(":/docker-entrypoint-initdb.d:ro")][0]
    assert "CREATE DATABASE prefect" in "".join(
        p.read_text() for p in (DEPLOY / init.split(":")[0]).glob("*.sql"))


SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING", "ACCESS_KEY", "SECRET_KEY")


def _interpolated(text: str) -> set[str]:
    """The variables a compose value takes from the env file: ${NAME}, ${NAME:?...}, ${NAME:-...} ($$ escapes)."""
    return set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))


def test_docker_compose_takes_every_secret_from_the_uncommitted_env_file():
    doc = _compose()
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in SECRET_WORDS) or "://" in str(value) and "@" in str(value):
                assert _interpolated(str(value)), f"{name}.{key} is written in the file: {value}"
        command = str(service.get("command", ""))
        assert not re.search(r"://[^:/\s]+:[^$@\s]+@", command), f"{name}: a password written into its command"
    required = {"POSTGRES_PASSWORD", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET",
                "PREFECT_AUTH_STRING"}
    text = (DEPLOY / "docker-compose.yml").read_text()
    for var in required:  # compose refuses to start without them instead of running with an empty secret
        assert re.search(r"\$\{" + var + r":\?", text), var
    example = {line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines()
               if "=" in line and not line.lstrip().startswith("#")}
    assert _interpolated(text) - {"MLFLOW_WORKER_USERNAME", "MLFLOW_WORKER_PASSWORD"} <= example
    ignored = [line.strip() for line in (DEPLOY.parent / ".gitignore").read_text().splitlines()]
    assert "deploy/.env" in ignored  # git never sees the real secrets
    assert "deploy/.env" in (DEPLOY / "Dockerfile.worker.dockerignore").read_text().split()
    assert (DEPLOY / "Dockerfile.mlflow.dockerignore").read_text().split()[-1] == "*"


def test_docker_compose_turns_on_mlflow_basic_auth_and_prefect_api_auth():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    assert "--app-name basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(env)
    ini = configparser.ConfigParser()
    mount = [v for v in mlflow["volumes"] if v.endswith(":" + env["MLFLOW_AUTH_CONFIG_PATH"] + ":ro")][0]
    ini.read(DEPLOY / mount.split(":")[0])
    assert "admin_password" not in ini["mlflow"] and ini["mlflow"]["database_uri"].startswith("sqlite:////")
    assert _interpolated(services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]) == \
        _interpolated(services["prefect-worker"]["environment"]["PREFECT_API_AUTH_STRING"]) == {"PREFECT_AUTH_STRING"}
    worker = services["prefect-worker"]["environment"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(worker)


def test_docker_compose_binds_every_published_port_to_loopback():
    services = _compose()["services"]
    published = [(name, str(p)) for name, s in services.items() for p in s.get("ports", [])]
    assert published, "the servers publish their ports"
    for name, port in published:
        assert port.startswith("127.0.0.1:") and port.count(":") == 2, f"{name}: {port}"
    assert "ports" not in services["postgres"] and "ports" not in services["prefect-worker"]


def _lock_module():
    spec = importlib.util.spec_from_file_location("flywheel_lock", DEPLOY / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_image_installs_the_project_with_its_locked_runtime_dependencies():
    dockerfile = (DEPLOY / "Dockerfile.worker").read_text()
    lock = _lock_module()
    assert dockerfile.count("/tmp/runtime.lock") == 3 and "sed '/^# --- dev:/,$d'" in dockerfile
    assert lock.DEV_MARK.startswith("# --- dev:")
    assert "--no-deps -e ." in dockerfile  # nothing beyond the lock gets resolved for the project itself
    assert re.search(r"^USER (?!root)", dockerfile, re.M)


def test_the_lock_pins_every_requirement_of_pyproject_inside_its_range():
    lock = _lock_module()
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    text = (DEPLOY / "requirements.lock").read_text()
    assert lock.problems(project, text) == []
    runtime, dev = lock.pins(text)
    assert "pytest" in dev and "uv" in dev and "pytest" not in runtime, "dev tools sit below the dev mark"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in {**runtime, **dev}.values())


def test_a_lock_that_disagrees_with_pyproject_is_caught_by_name():
    lock = _lock_module()
    text = f"torch==2.13.0\nuv==0.13.10\n{lock.DEV_MARK}\npytest==7.0\n"
    project = {"dependencies": ["torch>=2.13", "rich>=13", "uv>=0.14"], "optional-dependencies": {"dev": ["pytest>=8"]}}
    assert lock.problems(project, text) == [
        "rich (runtime) is not in requirements.lock",
        "requirements.lock pins uv==0.13.10, outside pyproject.toml's uv>=0.14",
        "requirements.lock pins pytest==7.0, outside pyproject.toml's pytest>=8"]


def test_the_installed_environment_is_exactly_the_lock():
    """make demo / make test install the lock with no resolution: what is installed is what is locked."""
    lock = _lock_module()
    written = lock.render(lock.closure(lock.ROOT), lock.closure(lock.ROOT, frozenset({"dev"})))
    assert written == (DEPLOY / "requirements.lock").read_text(), \
        "this venv's flywheel closure differs from deploy/requirements.lock: run `make lock` (or reinstall: make clean-venv)"


def test_kubernetes_job_template_is_valid_json_with_a_job_manifest():
    doc = json.loads((DEPLOY / "k8s" / "work-pool-job-template.json").read_text())
    assert doc["job_configuration"]["job_manifest"]["kind"] == "Job"
    assert "image" in doc["variables"]["properties"]


def test_accelerate_configs_parse_and_name_their_mode():
    from accelerate.commands.config.config_args import load_config_from_file

    modes = {p.stem: load_config_from_file(str(p)).distributed_type for p in (DEPLOY / "accelerate").glob("*.yaml")}
    assert {k: v.value for k, v in modes.items()} == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}

"""Team-server files cannot run on the offline dev machine: their syntax and wiring are checked here."""

from __future__ import annotations

import json
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


def test_docker_compose_has_prefect_mlflow_postgres_and_s3():
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(doc["services"])
    assert "postgresql://" in doc["services"]["mlflow"]["command"]
    assert "s3://" in doc["services"]["mlflow"]["command"]
    assert (DEPLOY / doc["services"]["prefect-worker"]["build"]["dockerfile"].removeprefix("deploy/")).exists()


def test_kubernetes_job_template_is_valid_json_with_a_job_manifest():
    doc = json.loads((DEPLOY / "k8s" / "work-pool-job-template.json").read_text())
    assert doc["job_configuration"]["job_manifest"]["kind"] == "Job"
    assert "image" in doc["variables"]["properties"]


def test_accelerate_configs_parse_and_name_their_mode():
    from accelerate.commands.config.config_args import load_config_from_file

    modes = {p.stem: load_config_from_file(str(p)).distributed_type for p in (DEPLOY / "accelerate").glob("*.yaml")}
    assert {k: v.value for k, v in modes.items()} == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}

"""Hub configs reach the hub; the tiny world stays offline; a hub id that cannot be fetched is one sentence.

No test here reaches the real hub: "no network" is a closed local port as HF_ENDPOINT, "no such repository"
and "gated" come from a small HTTP server on 127.0.0.1 that answers as the hub does.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flywheel.config import validate_config
from flywheel.env import OFFLINE_SWITCH, TELEMETRY_OFF, hub_references, offline_env

ROOT = Path(__file__).resolve().parent.parent
OLMO = "allenai/OLMo-2-0425-1B"

# main() decides the environment, then runs the command; the probe prints what the hub libraries were left with.
PROBE = """
import json, os, sys
from flywheel.cli import main
code = main(sys.argv[1:])
assert "transformers" not in sys.modules and "datasets" not in sys.modules  # `validate` imports neither
import huggingface_hub.constants as hub
keys = {keys!r}
print(json.dumps({{"code": code, "env": {{k: os.environ.get(k) for k in keys}}, "hub_offline": hub.HF_HUB_OFFLINE}}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """The test environment without the offline switch (conftest forces it on) plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_SWITCH}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _cli_env(config: str, **extra: str) -> dict:
    keys = [*offline_env()]
    out = subprocess.run([sys.executable, "-c", PROBE.format(keys=keys), "validate", config], cwd=ROOT,
                         env=_clean_env(**extra), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_hub_config_runs_online_and_keeps_telemetry_off():
    seen = _cli_env("configs/olmo-1b.yaml")
    assert seen["code"] == 0
    assert all(seen["env"][k] is None for k in OFFLINE_SWITCH), seen
    assert seen["hub_offline"] is False
    assert {k: seen["env"][k] for k in TELEMETRY_OFF} == {k: offline_env()[k] for k in TELEMETRY_OFF}


def test_the_tiny_world_config_runs_offline():
    seen = _cli_env("configs/demo.yaml")
    assert {k: seen["env"][k] for k in OFFLINE_SWITCH} == dict.fromkeys(OFFLINE_SWITCH, "1")
    assert seen["hub_offline"] is True
    assert {k: seen["env"][k] for k in TELEMETRY_OFF} == {k: offline_env()[k] for k in TELEMETRY_OFF}


@pytest.mark.parametrize(("config", "value", "offline"), [
    ("configs/olmo-1b.yaml", "1", True),  # a hub config, asked offline: stays offline
    ("configs/demo.yaml", "0", False),  # the tiny world, asked online: stays online
])
def test_a_users_hf_hub_offline_is_kept_either_way(config: str, value: str, offline: bool):
    seen = _cli_env(config, HF_HUB_OFFLINE=value)
    assert {k: seen["env"][k] for k in OFFLINE_SWITCH} == dict.fromkeys(OFFLINE_SWITCH, value)
    assert seen["hub_offline"] is offline


def test_hub_references_name_every_field_that_needs_the_hub(tmp_path: Path):
    local = tmp_path / "model"
    local.mkdir()
    world = validate_config({"name": "w", "home": str(tmp_path)})
    assert hub_references(world) == []
    assert hub_references(world, (str(local), "world:nano", None)) == []
    assert hub_references(world, ("org/ref",)) == [("option", "org/ref")]
    mixed = validate_config({
        "name": "m", "home": str(tmp_path),
        "model": {"source": str(local), "tokenizer": "org/tok"},
        "midtrain": {"reference": "org/ref"},
        "data": {"sources": [{"source": "world:midtrain"}, {"source": "org/corpus"}]},
        "posttrain": {"stages": [{"kind": "sft"}, {"kind": "grpo", "data": "org/prompts"}]},
        "evaluation": {"tasks": ["world", "world_gsm", "gsm8k"]},
    })
    assert hub_references(mixed) == [
        ("model.tokenizer", "org/tok"), ("midtrain.reference", "org/ref"), ("data.sources.1.source", "org/corpus"),
        ("posttrain.stages.1.data", "org/prompts"), ("evaluation.tasks", "gsm8k")]
    paper = validate_config({"name": "p", "home": str(tmp_path), "evaluation": {"tasks": ["paper10"]}})
    assert ("evaluation.tasks", "gsm8k_cot") in hub_references(paper)  # a preset of lm-eval's hub tasks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _midtrain(tmp_path: Path, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = _clean_env(HF_HOME=str(tmp_path / "hf"), FLYWHEEL_HOME=str(tmp_path / "home"), **extra)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "midtrain", "configs/olmo-1b.yaml"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - t0


def _one_sentence(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def test_offline_midtrain_of_a_hub_config_is_one_sentence_exit_2(tmp_path: Path):
    out, _ = _midtrain(tmp_path, HF_HUB_OFFLINE="1")
    assert _one_sentence(out) == (
        f"error: model.source: could not fetch '{OLMO}' from the Hugging Face Hub (offline: HF_HUB_OFFLINE=1 is "
        f"set); download it first (hf download {OLMO}) or point model.source at a local folder")


def test_no_network_is_one_sentence_without_the_hubs_retries(tmp_path: Path):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens: every connection is refused
    out, seconds = _midtrain(tmp_path, HF_ENDPOINT=endpoint)
    assert _one_sentence(out) == (
        f"error: model.source: could not fetch '{OLMO}' from the Hugging Face Hub (no network: cannot reach "
        f"{endpoint}); download it first (hf download {OLMO}) or point model.source at a local folder")
    assert "Retrying" not in out.stderr
    assert seconds < 45  # huggingface_hub alone retries ~25 s per file, twice here


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the hub does for a repository that does not exist, or one that is gated."""

    mode = "missing"

    def _answer(self) -> None:
        if self.mode == "gated" and self.path.startswith("/api/models/"):
            status, code, body = 200, None, {"id": OLMO, "sha": "0" * 40, "private": False, "gated": "auto"}
        elif self.mode == "gated":
            status, code, body = 403, "GatedRepo", {"error": "Access to model is restricted."}
        else:
            status, code, body = 404, "RepoNotFound", {"error": "Repository not found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("X-Error-Code", code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.mark.parametrize(("mode", "words"), [
    ("missing", "(no such repository, or a private one and you are not logged in); check the id (or log in "
                "with `hf auth login`) or point model.source at a local folder"),
    ("gated", "(it is gated: accept its terms on its Hub page and log in with `hf auth login`); download it first"),
])
def test_an_unknown_or_gated_repository_is_one_sentence(tmp_path: Path, mode: str, words: str):
    handler = type("Hub", (_FakeHub,), {"mode": mode})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out, _ = _midtrain(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    line = _one_sentence(out)
    assert line.startswith(f"error: model.source: could not fetch '{OLMO}' from the Hugging Face Hub "), line
    assert words in line


HUB_DATA = """
import sys
from flywheel.config import DataSource, validate_config
from flywheel.data.kinds import HUB, Piece
from flywheel.errors import FlywheelError
from flywheel.posttrain.data import read_source

cfg = validate_config({"name": "d", "home": sys.argv[1]})
for load in (lambda: read_source(cfg, "openai/gsm8k", "train", "main", field="posttrain.stages.0.data"),
             lambda: next(HUB.texts(Piece("openai/gsm8k", 0, 1, "hub"), DataSource(source="openai/gsm8k")))):
    try:
        load()
    except FlywheelError as exc:
        print(exc)
"""


@pytest.mark.parametrize(("extra", "why"), [
    ({"HF_HUB_OFFLINE": "1"}, "offline: HF_HUB_OFFLINE=1 is set"),
    ({"HF_ENDPOINT": "closed"}, "no network: cannot reach http://127.0.0.1:"),
])
def test_a_hub_dataset_that_cannot_be_fetched_is_one_sentence(tmp_path: Path, extra: dict[str, str], why: str):
    if extra.get("HF_ENDPOINT") == "closed":
        extra = {"HF_ENDPOINT": f"http://127.0.0.1:{_free_port()}"}
    out = subprocess.run([sys.executable, "-c", HUB_DATA, str(tmp_path / "home")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=_clean_env(HF_HOME=str(tmp_path / "hf"), **extra))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout
    for line, field in zip(lines, ("posttrain.stages.0.data", "data.sources"), strict=True):
        assert line.startswith(f"{field}: could not fetch the dataset 'openai/gsm8k' from the Hugging Face Hub "
                               f"({why}"), line
        assert line.endswith("; download it first (hf download --repo-type dataset openai/gsm8k --local-dir DIR) "
                             f"or point {field} at a downloaded .jsonl/.json/.parquet file"), line

"""What a build will write, before it starts: `prepare-data --plan` and the disk check that refuses a small disk.

The small disk is a real one: a 1 MiB tmpfs mounted as the home inside a private mount namespace
(`unshare --user --map-root-user --mount`), so no root and no cleanup are needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flywheel.config import validate_config
from flywheel.data.disk import CHECKPOINTS_KEPT, OPTIMIZER_BYTES, checkpoint_bytes, model_parameters
from flywheel.data.mixture import build_mixture, data_plan

from .conftest import byte_tokenizer, capability_missing
from .test_dolma_sources import _documents, _write_zst

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tokenizer and a tiny Llama config (no weights): all a plan reads of a model."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("model")
    byte_tokenizer().save_pretrained(folder)
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six .json.zst shards in Dolma's layout, about 1.5M byte-level tokens in all."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        _write_zst(root / f"data/web/{i:04d}/shard-{i:04d}.json.zst", [_documents(1200, "web", i)])
    return root


def _config(home: Path, model: Path, corpus: Path) -> dict:
    return {"name": "plan", "home": str(home), "model": {"source": str(model)},
            "data": {"sources": [{"source": str(corpus), "include": ["data/web/*"]}], "workers": 2},
            "midtrain": {"token_budget": 200_000, "seq_len": 64, "batch_size": 4, "objective": "remit",
                         "reference": str(model)}}


def _cli(args: list[str], home: Path, wrap: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flywheel.cli", *args]
    if wrap is not None:  # run inside a private mount namespace with a small tmpfs on the home
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   f"mount -t tmpfs -o size={wrap} tmpfs {home} && \"$@\"; rc=$?; echo \"left in home: $(ls -A {home})\"; "
                   "exit $rc", "sh", *command]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_plan_estimates_a_compressed_source_within_a_fifth_of_what_the_build_writes(tmp_path, model_folder,
                                                                                           corpus):
    home = tmp_path / "home"
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump(_config(home, model_folder, corpus)))
    out = _cli(["prepare-data", str(config), "--plan"], home)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if str(corpus) in line)
    cells = row.split("│") if "│" in row else row.split()
    assert " local " in row and " 6 " in row, row  # six files, read locally
    estimate = int(next(c for c in cells if c.strip().replace(",", "").isdigit() and len(c.strip()) > 5)
                   .strip().replace(",", ""))
    assert "fits" in out.stdout and not (home / "cache" / "tokens").exists()  # --plan builds nothing

    cfg = validate_config(_config(home, model_folder, corpus))
    tok = byte_tokenizer()
    built = build_mixture(cfg, tok, "t", workers=2)
    store = json.loads((built.folder / "meta.json").read_text())["sources"][0]["store_tokens"]
    assert abs(estimate - store) / store < 0.2, (estimate, store)


def test_the_checkpoints_are_counted_from_the_models_config_without_its_weights(tmp_path, model_folder, corpus):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = validate_config({**_config(tmp_path, model_folder, corpus),
                           "posttrain": {"stages": [{"kind": "sft", "data": str(corpus / "data/web/0000/"
                                                                                       "shard-0000.json.zst")}]}})
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_folder)).num_parameters()
    assert model_parameters(cfg) == real
    assert checkpoint_bytes(cfg, real) == real * ((4 + OPTIMIZER_BYTES) * CHECKPOINTS_KEPT + 4) * 2  # anneal + sft
    plan = data_plan(cfg, byte_tokenizer(), "t")
    assert plan.cache_bytes == 200_000 * 2  # float16 log-probs of the budget: cached ReMiT reads them
    assert plan.sources[0].how == "local" and plan.sources[0].files == 6


@pytest.fixture
def private_tmpfs(tmp_path):
    """Whether this machine lets a process mount a tmpfs in its own user and mount namespace (CI must)."""
    if shutil.which("unshare") is None:
        capability_missing("no unshare here (util-linux)")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"], capture_output=True, text=True)
    if probe.returncode:
        capability_missing(f"cannot mount a tmpfs in a private namespace here ({probe.stderr.strip()})")


def test_a_home_on_a_disk_too_small_refuses_with_both_numbers_and_writes_nothing(tmp_path, model_folder, corpus,
                                                                                   private_tmpfs):
    home = tmp_path / "small"
    home.mkdir()
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(_config(home, model_folder, corpus)))
    out = _cli(["prepare-data", str(config)], home, wrap="1m")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {home}: the run will write about "), lines[0]
    assert " MB here (token store, fetched files, reference cache, checkpoints) but 1.0 MB is free; " in lines[0]
    assert lines[0].endswith("--force builds anyway)"), lines[0]
    assert out.stdout.splitlines()[-1] == "left in home: "  # listed inside the namespace, on the tmpfs: nothing

    plan = _cli(["prepare-data", str(config), "--plan"], home, wrap="1m")
    assert plan.returncode == 0 and "does NOT fit" in plan.stdout, plan.stdout + plan.stderr


def test_the_paper_configs_plan_without_the_hub_is_one_sentence_naming_the_dataset(tmp_path, model_folder):
    """configs/olmo-1b.yaml with its model here but no network: the plan needs the hub for the Dolmino files."""
    from .test_hub_access import _clean_env, _free_port

    data = yaml.safe_load((REPO / "configs" / "olmo-1b.yaml").read_text())
    data["model"]["source"] = data["midtrain"]["reference"] = str(model_folder)
    data["home"] = str(tmp_path / "home")
    config = tmp_path / "olmo.yaml"
    config.write_text(yaml.safe_dump(data))
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "prepare-data", str(config), "--plan"], cwd=REPO,
                         env=_clean_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.strip()]
    assert line.startswith("error: data.sources.0.source: could not fetch the dataset 'allenai/dolmino-mix-1124' "
                           f"from the Hugging Face Hub (no network: cannot reach {endpoint}"), line
    assert not (tmp_path / "home" / "cache" / "tokens").exists()

"""The config is the user's first contact: good files load, bad ones get one clear line each and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flywheel.cli import main
from flywheel.config import load_config, validate_config
from flywheel.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "olmo-1b", "smollm3-3b"])
def test_ready_configs_validate(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.model.trust_remote_code is False


def test_paper_configs_carry_the_papers_settings():
    for name in ("olmo-1b", "smollm3-3b"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.midtrain.objective == "remit" and cfg.midtrain.epsilon == 0.2
        assert cfg.midtrain.token_budget == 50_000_000_000
        assert [s.kind for s in cfg.posttrain.stages] == ["sft", "dpo", "grpo"]
        assert cfg.evaluation.tasks == ["paper10"]


def test_defaults_fill_every_section():
    cfg = validate_config({"name": "x"})
    assert cfg.midtrain.epsilon == 0.2
    assert cfg.model.source == "world:nano"
    assert cfg.data.sources[0].source == "world:midtrain"
    assert cfg.posttrain.stages[0].data == "world:sft"
    assert cfg.posttrain.stages[-1].rewards == ["math_answer", "format"]
    assert cfg.home.is_absolute()


def test_home_defaults_to_FLYWHEEL_HOME(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "fw"))
    assert validate_config({"name": "x"}).home == (tmp_path / "fw").resolve()


def test_a_fresh_nested_home_gets_its_prefect_folder_before_prefect_starts(monkeypatch, tmp_path):
    from flywheel.env import use_flywheel_prefect

    for var in ("PREFECT_API_URL", "PREFECT_HOME", "FLYWHEEL_HOME"):
        monkeypatch.setenv(var, "")  # records the original, so what use_flywheel_prefect sets is undone afterwards
        monkeypatch.delenv(var)
    home = tmp_path / "not" / "yet" / "there"
    use_flywheel_prefect(validate_config({"name": "x", "home": str(home)}).home)
    assert (home / "prefect").is_dir()  # Prefect itself makes only the last folder and then fails to start
    assert Path(os.environ["PREFECT_HOME"]) == home / "prefect"


# (config document, fragment of the expected message)
BAD_CONFIGS = [
    ({"name": "x", "midtrain": {"epsilon": -0.1}}, "midtrain.epsilon: must be > 0 (got -0.1)"),
    ({"name": "x", "midtrain": {"epsilon": 1.5}}, "midtrain.epsilon: must be <= 1 (got 1.5)"),
    ({"name": "x", "midtrain": {"epsilom": 0.1}}, "midtrain.epsilom: unknown field; did you mean 'epsilon'?"),
    ({"name": "x", "midtrain": {"objective": "dpo"}}, "midtrain.objective: must be one of 'ntp', 'remit', 'kd'"),
    ({"name": "x", "midtrain": {"objective": "kd"}}, "midtrain.reference_mode: objective 'kd' needs"),
    ({"name": "x", "midtrain": {"reference_mode": "lazy"}}, "midtrain.reference_mode: must be one of"),
    ({"name": "x", "midtrain": {"token_budget": 0}}, "midtrain.token_budget: must be > 0 (got 0)"),
    ({"name": "x", "midtrain": {"start_from": "scratch"}}, "midtrain.start_from: must be one of"),
    ({"name": "x", "midtrain": {"rho1_keep": 0}}, "midtrain.rho1_keep: must be > 0"),
    ({"name": "x", "midtrain": {"lr": "fast"}}, "midtrain.lr: must be a valid number"),
    ({"name": "x", "midtrain": {"mapping": "tanh"}}, "midtrain.mapping: must be one of 'sigmoid', 'exp' or 'linear'"),
    ({"name": "x", "midtrain": {"centring": "median"}}, "midtrain.centring: must be one of 'mean' or 'zscore'"),
    ({"name": "x", "midtrain": {"loss_kernel": "triton"}}, "midtrain.loss_kernel: must be one of 'auto', 'chunked'"),
    ({}, "name: required field is missing"),
    ({"name": "has space"}, "name: use letters, digits"),
    ({"name": "x", "seed": -1}, "seed: must be >= 0 (got -1)"),
    ({"name": "x", "modle": {}}, "modle: unknown field; did you mean 'model'?"),
    ({"name": "x", "model": {"source": "./no/such/folder"}}, "model.source: local model folder does not exist"),
    ({"name": "x", "model": {"source": "world:huge"}}, "model.source: unknown tiny-world size 'huge'"),
    ({"name": "x", "model": {"dtype": "fp8"}}, "model.dtype: must be one of"),
    ({"name": "x", "data": {"sources": []}}, "data.sources: must have at least 1 item(s) (got 0)"),
    ({"name": "x", "data": {"sources": [{"source": "world:nope"}]}}, "data.sources.0.source: unknown tiny-world corpus"),
    ({"name": "x", "data": {"sources": [{"source": "missing.jsonl"}]}}, "data.sources.0.source: local data file does not"),
    ({"name": "x", "data": {"sources": [{"source": "world:midtrain", "weight": 0}]}}, "data.sources.0.weight: must be > 0"),
    ({"name": "x", "posttrain": {"stages": [{"kind": "ppo"}]}}, "posttrain.stages.0.kind: must be one of 'sft', 'dpo'"),
    ({"name": "x", "posttrain": {"stages": [{"kind": "sft", "rewards": ["format"]}]}},
     "posttrain.stages.0: only grpo stages take rewards"),
    ({"name": "x", "posttrain": {"stages": [{"kind": "grpo", "rewards": ["nope"]}]}},
     "posttrain.stages.0.rewards: unknown reward 'nope'"),
    ({"name": "x", "posttrain": {"stages": [{"kind": "grpo", "rewards": ["my.module.reward"]}]}},
     "set posttrain.allow_custom_rewards: true"),
    ({"name": "x", "posttrain": {"stages": [{"kind": "sft", "lr": 0}]}}, "posttrain.stages.0.lr: must be > 0"),
    ({"name": "x", "evaluation": {"tasks": []}}, "evaluation.tasks: must have at least 1 item(s)"),
    ({"name": "x", "evaluation": {"limit": 0}}, "evaluation.limit: must be >= 1 (got 0)"),
    ({"name": "x", "promotion": {"min_delta": -1}}, "promotion.min_delta: must be >= 0 (got -1)"),
    ({"name": "x", "promotion": {"force": "maybe"}}, "promotion.force: must be a valid boolean"),
    ({"name": "x", "promotion": {"guards": [{"metric": "eval/world_mc/acc", "max_drop": -1}]}},
     "promotion.guards.0.max_drop: must be >= 0 (got -1)"),
    ({"name": "x", "promotion": {"guards": [{"max_drop": 0.1}]}}, "promotion.guards.0.metric: required field"),
    ({"name": "x", "world": {"pretrain_tokens": -5}}, "world.pretrain_tokens: must be > 0"),
    (["name", "x"], "the top level must be a mapping of sections (got list)"),
]


@pytest.mark.parametrize(("doc", "fragment"), BAD_CONFIGS, ids=[f[1][:40] for f in BAD_CONFIGS])
def test_bad_config_names_the_field_and_exits_2(tmp_path, capsys, doc, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err


def test_every_problem_gets_its_own_line(tmp_path, capsys):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "seed": -1, "midtrain": {"epsilon": 0}}))
    assert main(["validate", str(path)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: x\nmidtrain:\n  epsilon: [0.1\n", "YAML syntax error at line"),
        ("name: x\n  bad: : indent\n", "YAML syntax error at line 2"),
        ("", "the file is empty"),
        ("   \n# only a comment\n", "the file is empty"),
    ],
)
def test_yaml_problems_name_the_file_and_line(tmp_path, capsys, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and fragment in err, err


def test_missing_config_file_says_so(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_valid_config_prints_a_summary(capsys):
    assert main(["validate", str(REPO / "configs" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "remit" in out and "sft → grpo" in out


def test_config_errors_raise_config_error_listing_all_problems():
    with pytest.raises(ConfigError) as info:
        validate_config({"name": "x", "seed": -1, "midtrain": {"lr": 0, "epsilon": 0}})
    assert len(info.value.problems) == 3


def test_console_script_exits_2_without_traceback(tmp_path):
    """Through the real installed entry point, as a user would type it."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmidtrain:\n  epsilon: -0.1\n")
    proc = subprocess.run([str(Path(sys.executable).with_name("flywheel")), "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "midtrain.epsilon: must be > 0 (got -0.1)" in proc.stderr
    assert "Traceback" not in proc.stderr

"""`flywheel rehearse`: the paper configs, pointed at local stand-ins in the real formats and schemas
(tests/standins.py), run end to end in miniature; seeded faults are each caught with their field.

The olmo-1b rehearsal is the real CLI on configs/olmo-1b.yaml with only its hub ids replaced by local paths: two
rounds, the Olmo2 class at vocabulary 100,352, torchrun on two CPU ranks, TRL's SFT, DPO and GRPO on Tulu-, OLMo
preference- and GSM8K-shaped rows, and the gate with the config's rule. The faults stop in the rehearsal's
preparation or its checks, before anything trains, so they run in this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.config import load_config, validate_config

from . import standins
from .test_dolma_sources import _documents, _write_gz
from .test_flows import BIN, REPO
from .test_launch import CPU_FSDP

ROUND_STAGES = ("score_reference", "midtrain", "evaluate/base", "posttrain", "evaluate/post", "promote")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    return standins.write_all(tmp_path_factory.mktemp("standins"))


def _config(name: str, stand_ins: dict[str, Path], folder: Path, edit=None) -> Path:
    """configs/<name>.yaml pointed at the stand-ins, optionally edited as text (a seeded fault)."""
    path = standins.local_config(REPO / "configs" / f"{name}.yaml", stand_ins, folder / f"{name}.yaml",
                                 folder / "home")
    if edit is not None:
        path.write_text(edit(path.read_text()))
    return path


@pytest.fixture(scope="module")
def olmo_rehearsal(stand_ins, tmp_path_factory):
    folder = tmp_path_factory.mktemp("olmo")
    config = _config("olmo-1b", stand_ins, folder)
    proc = subprocess.run([str(BIN / "flywheel"), "rehearse", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=1500, env=dict(os.environ), start_new_session=True)
    return config, proc


def test_the_olmo_config_rehearses_two_rounds_on_stand_ins_with_every_stage_passed(olmo_rehearsal):
    _, proc = olmo_rehearsal
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for round_n in (0, 1):
        for stage in ROUND_STAGES:
            row = re.search(rf"│ {round_n}\s+│ {re.escape(stage)}\s+│ (\w+)", out)
            assert row is not None, f"round {round_n} {stage} missing:\n{out[-4000:]}"
            expected = "skipped" if (round_n, stage) == (0, "score_reference") else "passed"  # round 0 is NTP
            assert row.group(1) == expected, f"round {round_n} {stage}: {row.group(1)}\n{out[-4000:]}"
    assert "every stage passed" in out and "Traceback" not in out
    for line in ("model.dtype: bfloat16 -> float32", "posttrain.stages.0.args.bf16: true -> removed",
                 "launch: 1 node(s) x 8 processes -> 1 x 2 CPU processes (gloo)",
                 "promotion.approval: required -> auto (a rehearsal's rounds decide by their gate)"):
        assert f"replaced  {line}" in out, out[-4000:]


def test_the_rehearsal_keeps_the_real_class_vocabulary_and_launcher_and_marks_everything_it_writes(olmo_rehearsal):
    from flywheel.round.rehearsal import rehearsal_home
    from flywheel.tracking.store import REHEARSAL_TAG, open_tracker

    config, proc = olmo_rehearsal
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    home = rehearsal_home(load_config(config))
    for model in ("base", "reference"):
        conf = json.loads((home / "models" / model / "config.json").read_text())
        assert (conf["architectures"], conf["vocab_size"], conf["num_hidden_layers"]) == (
            ["Olmo2ForCausalLM"], 100352, 2)
    for stage in ("midtrain", "posttrain"):  # torchrun x 8 in the config: two CPU ranks here, in both rounds
        jobs = sorted((home / "launch" / "olmo-1b-rehearsal").glob(f"round-*/{stage}-*"))
        assert len(jobs) == 2 and all((j / "logs" / "rank1.log").exists() for j in jobs), jobs
    rcfg = load_config(home / "rehearsal.yaml")
    assert rcfg.tracking.rehearsal and rcfg.name == "olmo-1b-rehearsal" and rcfg.posttrain.chat_template == "tulu"
    tracker = open_tracker(rcfg)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=200)
    assert len(runs) >= 12 and all(r.data.tags.get(REHEARSAL_TAG) == "true" for r in runs)
    versions = tracker.client.search_model_versions("name = 'olmo-1b-rehearsal-rl'")
    assert len(versions) == 2 and all(v.tags.get(REHEARSAL_TAG) == "true" for v in versions)


def test_the_smollm3_config_rehearses_with_its_class_vocabulary_and_fsdp_anneal_on_stand_ins(stand_ins, tmp_path):
    """One round here (round 1 adds only the cached ReMiT anneal, which the olmo rehearsal and test_launch's FSDP
    tests cover); `flywheel rehearse` on it runs both rounds, every stage passed, in about 4.5 minutes."""
    config = _config("smollm3-3b", stand_ins, tmp_path)
    # accelerate drops FSDP on CPU processes (the rehearsal says so); the test-only patch keeps it, so the anneal
    # really shards the SmolLM3 layers and gathers them to publish, as on GPUs
    env = {**os.environ, "FLYWHEEL_TEST_CPU_FSDP": "1", "PYTHONPATH": str(CPU_FSDP)}
    proc = subprocess.run([str(BIN / "flywheel"), "rehearse", str(config), "--rounds", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "every stage passed" in out, out[-4000:]
    for line in ("launch.stages.midtrain.config_file: mixed_precision bf16 -> no (CPU)",
                 "launch.stages.midtrain.config_file: FSDP -> DDP"):
        assert f"replaced  {line}" in out, out[-4000:]
    from flywheel.round.rehearsal import rehearsal_home

    home = rehearsal_home(load_config(config))
    conf = json.loads((home / "models" / "base" / "config.json").read_text())
    assert (conf["architectures"], conf["vocab_size"], len(conf["no_rope_layers"])) == (
        ["SmolLM3ForCausalLM"], 128256, 2)
    record = json.loads(next((home / "runs").rglob("flywheel-midtrain.json")).read_text())
    assert record["fsdp"] and record["world_size"] == 2, record  # accelerate FSDP on two CPU processes


def _misspelt_trl_argument(text: str) -> str:
    return text.replace("max_length: 4096, gradient_checkpointing", "max_lenght: 4096, gradient_checkpointing")


def _guard_on_an_unreported_metric(text: str) -> str:
    return text.replace("eval/truthfulqa_mc2/acc,", "eval/truthfulqa_mc2/accuracy,")


def _no_chat_template(text: str) -> str:
    return text.replace("  chat_template: tulu\n", "")


FAULTS = {  # fault -> (the config's edit, the stand-ins' edit, the step that catches it, what its sentence says)
    "misspelt TRL argument": (_misspelt_trl_argument, None, "check",
                              "posttrain.stages.0.args.max_lenght: not a field of TRL's SFTConfig"),
    "preferences without rejected": (None, "preferences", "check",
                                     "posttrain.stages.1 (dpo) needs column(s) chosen, rejected but rejected is "
                                     "missing"),
    "guard on an unreported metric": (_guard_on_an_unreported_metric, None, "prepare",
                                      "promotion.guards.0.metric: 'eval/truthfulqa_mc2/accuracy' is not a metric"),
    "subset without the text field": (None, "subset", "prepare", "set data.sources.5.text_field"),
    "tokenizer without a chat template": (_no_chat_template, "template", "check",
                                          "posttrain.chat_template: the tokenizer of"),
}


def _broken_stand_ins(which: str | None, good: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The stand-ins with one of them broken (a copy; the good ones are shared by the module)."""
    paths = dict(good)
    if which == "preferences":
        paths["allenai/olmo-2-0425-1b-preference-mix"] = standins.write_preferences(folder / "prefs.jsonl",
                                                                                    drop="rejected")
    elif which == "subset":  # the math subset's documents hold their text under another name
        import shutil

        shutil.copytree(good["allenai/dolmino-mix-1124"], folder / "dolmino")
        for old in (folder / "dolmino" / "data" / "math").rglob("*.gz"):
            _write_gz(old, _documents(25, "math", 7, field="content"))
        paths["allenai/dolmino-mix-1124"] = folder / "dolmino"
    elif which == "template":
        paths["allenai/OLMo-2-0425-1B"] = standins.write_model(folder / "no-template", "olmo2", template=None)
    return paths


@pytest.mark.parametrize("fault", FAULTS)
def test_a_seeded_fault_fails_the_rehearsal_before_training_with_one_sentence_naming_its_field(
        fault, stand_ins, tmp_path):
    from flows.rehearsal import rehearse

    edit, broken, step, sentence = FAULTS[fault]
    config = _config("olmo-1b", _broken_stand_ins(broken, stand_ins, tmp_path), tmp_path, edit)
    outcome = rehearse(load_config(config), rounds=2, rows=16, steps=1)
    assert not outcome.passed
    failed = [c for c in outcome.checks if c.status == "failed"]
    assert [(c.stage, c.round) for c in failed] == [(step, None)], outcome.checks
    assert sentence in failed[0].detail and "\n" not in failed[0].detail, failed[0].detail
    assert not any(c.stage in ROUND_STAGES for c in outcome.checks)  # nothing trained


def test_a_failed_rehearsal_exits_1_with_the_checklist_and_the_first_error_and_no_traceback(stand_ins, tmp_path):
    config = _config("olmo-1b", stand_ins, tmp_path, _misspelt_trl_argument)
    proc = subprocess.run([str(BIN / "flywheel"), "rehearse", str(config), "--rows", "8"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ), start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "rehearsal checklist" in out, out[-3000:]
    first = [line for line in out.splitlines() if line.startswith("first error: ")]
    assert len(first) == 1 and first[0].startswith(f"first error: {FAULTS['misspelt TRL argument'][3]}"), out
    assert "did you mean max_length" in first[0], first[0]


def test_the_paper_configs_guards_are_metrics_their_tasks_report_and_a_misnamed_one_is_refused():
    from flywheel.errors import FlywheelError
    from flywheel.round.checks import check_gate_metric

    for name in ("olmo-1b", "smollm3-3b"):
        check_gate_metric(load_config(REPO / "configs" / f"{name}.yaml"))  # read from lm-eval's task configs
    data = load_config(REPO / "configs" / "olmo-1b.yaml").model_dump(mode="json")
    data["promotion"]["guards"][1]["metric"] = "eval/ifeval/prompt_strict_acc"
    with pytest.raises(FlywheelError, match=r"promotion.guards.1.metric: 'eval/ifeval/prompt_strict_acc' is not a "
                                            r"metric .*eval/ifeval/prompt_level_strict_acc"):
        check_gate_metric(validate_config(data))


def test_a_round_refuses_a_misspelt_trl_argument_before_it_starts(small_world, tmp_path):
    from flywheel.errors import FlywheelError
    from flywheel.round.plan import plan_round
    from flywheel.tracking.store import open_tracker

    from .conftest import small_config

    cfg, _ = small_world
    bad = small_config(cfg.home, name="misspelt", posttrain={"stages": [
        {"kind": "sft", "max_steps": 2, "args": {"learning_rat": 1e-4}}]})
    with pytest.raises(FlywheelError, match=r"posttrain.stages.0.args.learning_rat: .*did you mean learning_rate"):
        plan_round(bad)
    assert open_tracker(bad).round_runs() == {}  # refused before the round was recorded


STREAM_FIRST_ROWS = """
import json, sys
from flywheel.config import validate_config
from flywheel.posttrain.data import read_source
cfg = validate_config({"name": "s", "home": sys.argv[1]})
rows, source, _ = read_source(cfg, "org/gsm", limit=5)
print(json.dumps({"rows": rows, "source": source}))
"""


def test_a_hub_dataset_is_streamed_for_its_first_rows_and_never_downloaded(tmp_path):
    """The rehearsal's post-training samples: `read_source(limit=)` streams a hub dataset (here tests/hub_standin.py,
    with the real datasets and huggingface_hub clients in a process of their own, online) and stops after N rows."""
    from .hub_standin import HubStandin

    repo = tmp_path / "repo"
    standins.write_gsm8k(repo / "train.jsonl", n=5000)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                           "TRANSFORMERS_OFFLINE")}
    with HubStandin({"org/gsm": repo}) as hub:
        proc = subprocess.run([sys.executable, "-c", STREAM_FIRST_ROWS, str(tmp_path / "home")], cwd=REPO,
                              capture_output=True, text=True, timeout=300,
                              env={**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [json.loads(line) for line in (repo / "train.jsonl").read_text().splitlines()[:5]]
    assert got == {"rows": expected, "source": "org/gsm"}
    assert not list((tmp_path / "hf").rglob("blobs/*"))  # streamed: nothing of the dataset in the hub cache

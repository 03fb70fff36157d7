"""The evaluation stage on the tiny world: bundled lm-eval tasks, flat metric names, protocol, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flywheel.data.io import read_jsonl
from flywheel.errors import FlywheelError
from flywheel.evaluation import BUNDLED, PRESETS, TASKS_DIR, evaluate, format_table
from flywheel.evaluation.registry import full_task_manager
from flywheel.evaluation.run import _resolve_checkpoint, check_backend, lm_eval_model, protocol
from flywheel.evaluation.world_data import EVAL_FILE, FEWSHOT_FILE, write_rows
from flywheel.metrics import PRIMARY_METRICS, flatten_results
from flywheel.tracking.gate import NotComparable, check_comparable
from flywheel.world.tasks import is_heldout

from .conftest import small_config

LIMIT = 10  # documents per task: enough to compare, quick on two CPU cores
WORLD_METRICS = {"eval/avg", "eval/world_gsm/exact_match", "eval/world_gsm/bpb", "eval/world_mc/acc",
                 "eval/world_mc/acc_norm"}  # bpb: evaluation.likelihood (tests/test_likelihood.py)
NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto")
_network_attempts: list[tuple[str, str]] = []
_recording = False


def _audit(event: str, args: tuple) -> None:
    """Record socket use while a test listens; audit hooks see attempts even when they would fail."""
    if _recording and event in NETWORK_EVENTS:
        _network_attempts.append((event, repr(args)[:200]))


@pytest.fixture(scope="module", autouse=True)
def one_thread(small_world):
    """Two torch threads on two busy cores thrash (10x slower); set after the shared world is built, not before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(small_world) -> Path:
    return small_world[1].paths.base


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-home")


@pytest.fixture(scope="module")
def base_eval(base, home):
    """One few-shot evaluation of the world base, with every network attempt recorded by an audit hook."""
    global _recording
    sys.addaudithook(_audit)  # hooks cannot be removed; this one records only while `_recording`
    _recording = True
    socket.getaddrinfo("localhost", 80)  # local lookup: proves the hook sees name resolution at all
    assert _network_attempts, "the audit hook records nothing; the network test would pass vacuously"
    _network_attempts.clear()
    try:
        result = evaluate(small_config(home, evaluation={"limit": LIMIT}), base)
    finally:
        _recording = False
    return result


def test_no_network_access_is_attempted_during_evaluation(base_eval):
    assert _network_attempts == []


def test_world_preset_metric_names_are_stable(base_eval):
    assert set(base_eval.metrics) == WORLD_METRICS
    primaries = [base_eval.metrics["eval/world_gsm/exact_match"], base_eval.metrics["eval/world_mc/acc"]]
    assert base_eval.metrics["eval/avg"] == pytest.approx(sum(primaries) / 2)


def test_results_and_per_sample_outputs_are_saved_side_by_side(base_eval, home):
    assert base_eval.results_path.parent == base_eval.samples_path.parent
    assert base_eval.results_path.parent.parent == home / "evals"
    saved = json.loads(base_eval.results_path.read_text())
    assert saved["metrics"] == base_eval.metrics and saved["kind"] == "base"
    assert saved["lm_eval"]["n-shot"] == {"world_gsm": 3, "world_mc": 3}
    rows = [r for r in read_jsonl(base_eval.samples_path) if "request" not in r]  # not the gold-likelihood rows
    assert sorted({r["task"] for r in rows}) == ["world_gsm", "world_mc"]
    assert len(rows) == 2 * LIMIT
    gsm = next(r for r in rows if r["task"] == "world_gsm")
    assert gsm["prompt"].endswith(gsm["doc"]["question"] + "\n")  # the pre-training document format
    assert gsm["prompt"].count("\n####") == 3  # three worked few-shot examples before the question
    assert not list(base_eval.results_path.parent.glob("*.tmp"))


def test_table_shows_every_metric_and_the_average(base_eval):
    lines = format_table(base_eval.metrics).splitlines()
    for key, value in base_eval.metrics.items():
        task, metric = ("average", "primary") if key == "eval/avg" else key.split("/")[1:]
        assert any(task in line and metric in line and f"{value:.4f}" in line for line in lines), key


def test_same_checkpoint_evaluated_twice_gives_identical_metrics(base_eval, base, home):
    again = evaluate(small_config(home, evaluation={"limit": LIMIT}), base)
    assert again.metrics == base_eval.metrics
    first, second = read_jsonl(base_eval.samples_path), read_jsonl(again.samples_path)
    assert [r["response"] for r in first] == [r["response"] for r in second]


def test_post_trained_evaluation_is_zero_shot_through_the_chat_template(base_eval, base, home):
    post = evaluate(small_config(home, evaluation={"limit": LIMIT}), base, kind="post")
    assert post.kind == "post" and post.results_path.parent != base_eval.results_path.parent
    rows = read_jsonl(post.samples_path)
    assert rows and all(r["prompt"].startswith("<|bos|><|user|>") for r in rows)
    assert all(r["prompt"].endswith("<|end|>\n<|assistant|>") for r in rows)
    gsm = next(r for r in rows if r["task"] == "world_gsm")
    assert f"<|user|>{gsm['doc']['question']}<|end|>" in gsm["prompt"]  # exactly the question, as in SFT
    assert json.loads(post.results_path.read_text())["lm_eval"]["n-shot"] == {"world_gsm": 0, "world_mc": 0}
    assert not any("<|user|>" in r["prompt"] for r in read_jsonl(base_eval.samples_path))


def _fine_tune(base: Path, texts: list[str], out: Path, steps: int = 150, lr: float = 3e-3) -> Path:
    """A few seconds of full-batch training on `texts` (pre-training document format, EOS-terminated)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.data.packing import tokenize_documents

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    docs = tokenize_documents(texts, tok)
    width = max(map(len, docs))
    ids = torch.full((len(docs), width), tok.pad_token_id)
    labels = torch.full((len(docs), width), -100)
    for i, doc in enumerate(docs):
        ids[i, : len(doc)] = labels[i, : len(doc)] = torch.tensor(doc)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _untrained(base: Path, out: Path) -> Path:
    """A freshly initialised model of the same size and tokenizer: the floor every score must rise from."""
    from transformers import AutoTokenizer

    from flywheel.world.model import new_model

    tok = AutoTokenizer.from_pretrained(base)
    new_model("nano", tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# A positive control for the scorer, the prompts and the labels: a model that learned the worked solutions of
# the evaluated problems must beat a fresh one on BOTH tasks; a wrong label, a broken extractor or a prompt that
# does not match the document format each make it fail. Solving *unseen* problems takes a nano model ~2M tokens
# of pre-training (minutes here; such a base scores world_mc 0.40 and world_gsm 0.05 against an untrained
# model's 0.23 and 0), which is the world build's job, not this test's.
def test_model_trained_on_the_solutions_outscores_an_untrained_one(base, tmp_path):
    """The evaluation rewards knowing the answers: trained beats untrained on generation and on choice."""
    rows = read_jsonl(TASKS_DIR / EVAL_FILE)[:LIMIT]
    trained = _fine_tune(base, [r["question"] + "\n" + r["solution"] for r in rows], tmp_path / "trained")
    untrained = _untrained(base, tmp_path / "untrained")
    cfg = small_config(tmp_path / "home", evaluation={"limit": LIMIT, "num_fewshot": 0})
    good, floor = evaluate(cfg, trained).metrics, evaluate(cfg, untrained).metrics
    assert good["eval/world_gsm/exact_match"] >= 0.8 > floor["eval/world_gsm/exact_match"]
    assert good["eval/world_mc/acc"] >= 0.8 > floor["eval/world_mc/acc"]
    assert good["eval/avg"] > floor["eval/avg"] + 0.3


def test_unknown_task_fails_with_the_closest_names_before_any_model_loads(tmp_path):
    cfg = small_config(tmp_path, evaluation={"tasks": ["world", "world_gsn"]})
    with pytest.raises(FlywheelError) as err:
        evaluate(cfg, tmp_path / "no-such-checkpoint")  # a model load would fail on the missing folder first
    message = str(err.value)
    assert "'world_gsn'" in message and "world_gsm" in message
    assert "no-such-checkpoint" not in message


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FlywheelError, match="checkpoint folder not found"):
        evaluate(small_config(tmp_path), tmp_path / "no-such-checkpoint")


def test_plain_lm_eval_cli_runs_the_bundled_task_from_any_directory(base, tmp_path):
    lm_eval = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval)] if lm_eval.exists() else [sys.executable, "-m", "lm_eval"]
    command += ["--model", "hf", "--model_args", f"pretrained={base},dtype=float32", "--tasks", "world_gsm",
                "--include_path", str(TASKS_DIR), "--device", "cpu", "--limit", "3", "--batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("|world_gsm"))
    cells = [c.strip() for c in row.split("|")]
    assert 0.0 <= float(cells[cells.index("exact_match") + 2]) <= 1.0  # the score column


def test_bundled_task_data_matches_the_generator_and_is_held_out(tmp_path):
    counts = write_rows(tmp_path)  # what scripts/make_eval_tasks.py writes
    for name in (EVAL_FILE, FEWSHOT_FILE):
        assert (tmp_path / name).read_bytes() == (TASKS_DIR / name).read_bytes(), (
            f"{name} drifted from the generator; run scripts/make_eval_tasks.py and commit the result"
        )
    evaluated, shots = read_jsonl(TASKS_DIR / EVAL_FILE), read_jsonl(TASKS_DIR / FEWSHOT_FILE)
    assert counts == {EVAL_FILE: len(evaluated), FEWSHOT_FILE: len(shots)}
    assert len(evaluated) >= 150 and {r["level"] for r in evaluated} == {1, 2, 3, 4, 5}
    assert all(is_heldout(r["id"]) for r in evaluated)
    assert len({r["id"] for r in evaluated}) == len(evaluated)
    assert not any(is_heldout(r["id"]) for r in shots)
    for r in evaluated + shots:
        assert r["choices"][r["label"]] == r["solution"] and len(set(r["choices"])) == 4
    assert not [p for p in TASKS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"]  # package data is flat


def test_flatten_results_names_filters_and_averages_groups_once():
    results = {
        "results": {
            "world_mc": {"alias": "world_mc", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 10},
            "gsm8k_cot": {"exact_match,strict-match": 0.2, "exact_match,flexible-extract": 0.3},
            "bbh_cot_fewshot_a": {"exact_match,get-answer": 0.0},
            "bbh_cot_fewshot_b": {"exact_match,get-answer": 1.0},
        },
        "groups": {"bbh_cot_fewshot": {"exact_match,get-answer": 0.5, "exact_match_stderr,get-answer": "N/A"}},
        "group_subtasks": {"bbh_cot_fewshot": ["bbh_cot_fewshot_a", "bbh_cot_fewshot_b"]},
    }
    flat = flatten_results(results)
    assert flat["eval/world_mc/acc"] == 0.5
    assert flat["eval/gsm8k_cot/exact_match_strict_match"] == 0.2
    assert flat["eval/gsm8k_cot/exact_match_flexible_extract"] == 0.3
    assert flat["eval/bbh_cot_fewshot_b/exact_match_get_answer"] == 1.0
    assert flat["eval/avg"] == pytest.approx((0.5 + 0.3 + 0.5) / 3)  # bbh counts once, by its group score
    assert not any("stderr" in k or "sample_len" in k or "alias" in k for k in flat)


@pytest.mark.slow
def test_every_paper10_task_resolves_in_the_installed_lm_eval():
    known = set(full_task_manager().all_tasks)  # ~14 s: indexes lm-eval's built-in tasks
    missing = [task for task, _ in PRESETS["paper10"] if task not in known]
    assert missing == []
    assert all(task in PRIMARY_METRICS for task, _ in PRESETS["paper10"])
    assert {"world", *BUNDLED} <= known


VLLM_MISSING = ("evaluation.backend: vllm needs the vllm package, which is not installed; "
                "pip install -e '.[vllm]' or set backend: hf")
VLLM_NO_GPU = "evaluation.backend: vllm needs a CUDA GPU, which this machine lacks; set backend: hf"


def test_vllm_backend_stops_with_one_sentence_naming_what_this_machine_lacks(tmp_path, monkeypatch):
    """Without vllm: how to install it; with vllm but no GPU: use hf. Said before the checkpoint is looked at."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU machine answers as a CPU one does
    expected = VLLM_MISSING if importlib.util.find_spec("vllm") is None else VLLM_NO_GPU
    cfg = small_config(tmp_path, evaluation={"backend": "vllm"})
    with pytest.raises(FlywheelError) as err:
        evaluate(cfg, tmp_path / "no-such-checkpoint")  # unchecked, this fails on the missing folder instead
    assert str(err.value) == expected
    with pytest.raises(FlywheelError) as direct:  # what config validation calls before a round starts
        check_backend(cfg)
    assert str(direct.value) == expected


def test_hf_backend_builds_the_same_lm_eval_model_args_as_before(base, tmp_path):
    cfg = small_config(tmp_path)
    assert cfg.evaluation.backend == "hf"
    model, tokenizer = _resolve_checkpoint(cfg, base)
    before = {"pretrained": str(base.resolve()), "dtype": "float32", "use_safetensors": True,
              "trust_remote_code": False}
    assert (model, tokenizer) == (str(base.resolve()), None)
    assert lm_eval_model(cfg, model, tokenizer) == ("hf", before)
    assert lm_eval_model(cfg, model, "some/tokenizer", gpus=8) == ("hf", before | {"tokenizer": "some/tokenizer"})
    check_backend(cfg)  # hf needs nothing more: no error on this CPU machine


def test_vllm_backend_runs_one_replica_per_gpu_at_the_models_length(base, tmp_path):
    cfg = small_config(tmp_path, evaluation={"backend": "vllm"}, model={"dtype": "bfloat16", "trust_remote_code": True})
    model, tokenizer = _resolve_checkpoint(cfg, base)
    positions = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    assert lm_eval_model(cfg, model, tokenizer, gpus=8) == ("vllm", {
        "pretrained": model, "dtype": "bfloat16", "trust_remote_code": True, "tensor_parallel_size": 1,
        "data_parallel_size": 8, "gpu_memory_utilization": 0.8, "max_model_len": positions, "seed": 1234,
    })  # fmt: skip
    hub = lm_eval_model(cfg, "org/model", None, gpus=1)[1]
    assert hub["max_model_len"] is None and hub["data_parallel_size"] == 1  # a hub id: vLLM reads its length


def test_base_evaluation_records_the_hf_backend(base_eval):
    assert base_eval.backend == "hf"
    assert json.loads(base_eval.results_path.read_text())["backend"] == "hf"
    assert "backend" not in json.loads(base_eval.items_path.read_text())["protocol"]  # older items still pair


def test_vllm_items_do_not_pair_with_hf_items(tmp_path):
    hf = {"protocol": protocol(small_config(tmp_path), "base")}
    vllm = {"protocol": protocol(small_config(tmp_path, evaluation={"backend": "vllm"}), "base")}
    check_comparable(hf, dict(hf), "the reference")
    with pytest.raises(NotComparable, match="backend None vs 'vllm' now"):
        check_comparable(vllm, hf, "the reference")

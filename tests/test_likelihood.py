"""Bits per byte of the gold solution (evaluation/likelihood.py): right numbers, right place, no change to eval/avg."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from flywheel.data.io import read_jsonl
from flywheel.evaluation import evaluate
from flywheel.evaluation.items import metric_terms
from flywheel.evaluation.likelihood import GOLD_TARGETS, REQUEST, SUFFIX, companions
from flywheel.evaluation.registry import resolve_tasks, task_manager
from flywheel.evaluation.run import _load_tasks
from flywheel.metrics import higher_is_better
from flywheel.tracking.gate import paired_delta

from . import test_evaluation
from .conftest import small_config

base = test_evaluation.base  # fixture: the session world's base checkpoint
one_thread = test_evaluation.one_thread  # autouse fixture: one torch thread on the two busy cores

LIMIT = 6
BPB = "eval/world_gsm/bpb"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("likelihood-home")


def _cfg(home: Path, **evaluation):
    return small_config(home, evaluation={"limit": LIMIT, "num_fewshot": 0, **evaluation})


@pytest.fixture(scope="module")
def base_on(base, home):
    return evaluate(_cfg(home), base)


@pytest.fixture(scope="module")
def base_off(base, home):
    return evaluate(_cfg(home, likelihood=False), base)


@pytest.fixture(scope="module")
def post_on(base, home):
    return evaluate(_cfg(home), base, kind="post")


def _gold_rows(result) -> list[dict]:
    return [r for r in read_jsonl(result.samples_path) if r.get("request") == REQUEST]


def _generated(result) -> dict[int, dict]:
    """world_gsm's own (generation) rows by document."""
    rows = read_jsonl(result.samples_path)
    return {r["doc_id"]: r for r in rows if r["task"] == "world_gsm" and "request" not in r}


def _direct_bpb(model, tok, prompt: str, continuation: str) -> float:
    """The model's bits per byte of `continuation` after `prompt`, encoded as lm-eval's HFLM encodes a pair."""
    prefix = tok.decode(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)

    def encode(text: str) -> list[int]:  # HFLM.tok_encode: no second BOS when the text starts with one
        return tok.encode(text, add_special_tokens=False) if text.startswith(prefix) else tok.encode(text)

    whole, context = encode(prompt + continuation), encode(prompt)
    scored = whole[len(context):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[-len(scored):]
    loglikelihood = logprobs.gather(1, torch.tensor(scored)[:, None]).sum().item()
    return -loglikelihood / (math.log(2) * len(continuation.encode("utf-8")))


def _assert_bpb_matches_a_forward_pass(result, checkpoint: Path) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _gold_rows(result)
    assert len(rows) == LIMIT and all(r["task"] == "world_gsm" for r in rows)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for row in rows:
        (continuation,) = row["continuations"]
        assert continuation.lstrip("\n") == row["doc"]["solution"]  # the gold, after whitespace moved off the prompt
        assert row["scores"]["bpb"] == pytest.approx(_direct_bpb(model, tok, row["prompt"], continuation), abs=1e-5)
    return [r["scores"]["bpb"] for r in rows]


def test_base_bpb_of_every_item_equals_a_direct_forward_pass_over_the_gold_solution(base_on, base):
    values = _assert_bpb_matches_a_forward_pass(base_on, base)
    generated = _generated(base_on)
    for row in _gold_rows(base_on):  # the prompt the task itself used, with its trailing newline moved
        assert row["prompt"] + row["continuations"][0][:1] == generated[row["doc_id"]]["prompt"]
    assert base_on.metrics[BPB] == pytest.approx(sum(values) / len(values))
    assert 0 < base_on.metrics[BPB] < 8


def test_post_bpb_is_scored_after_the_chat_template_and_equals_a_direct_forward_pass(post_on, base):
    values = _assert_bpb_matches_a_forward_pass(post_on, base)
    generated = _generated(post_on)
    for row in _gold_rows(post_on):
        assert row["prompt"] == generated[row["doc_id"]]["prompt"]  # the same chat prompt, no delimiter added
        assert row["prompt"].startswith("<|bos|><|user|>") and row["prompt"].endswith("<|assistant|>")
        assert row["continuations"] == [row["doc"]["solution"]]
    assert post_on.metrics[BPB] == pytest.approx(sum(values) / len(values))


def test_items_hold_every_bpb_beside_the_task_scores_and_the_gate_pairs_them(base_on):
    items = json.loads(base_on.items_path.read_text())
    per_item = items["scores"]["world_gsm"]["bpb"]
    assert set(items["scores"]["world_gsm"]) == {"exact_match", "bpb"}
    assert per_item == {str(r["doc_id"]): r["scores"]["bpb"] for r in _gold_rows(base_on)}
    assert sum(per_item.values()) / len(per_item) == pytest.approx(base_on.metrics[BPB])
    assert metric_terms(items, BPB) == {("world_gsm", "bpb"): 1.0}
    same = paired_delta(items, items, BPB, resamples=200)
    assert (same.delta, same.items) == (0.0, LIMIT)


def test_companion_changes_no_other_metric_and_never_appears_as_a_task(base_on, base_off):
    assert set(base_on.metrics) - set(base_off.metrics) == {BPB}
    assert {k: v for k, v in base_on.metrics.items() if k != BPB} == base_off.metrics  # eval/avg included
    saved = json.loads(base_on.results_path.read_text())["lm_eval"]
    for section in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert set(saved[section]) == {"world_gsm", "world_mc"}, section
    assert saved["higher_is_better"]["world_gsm"] == {"exact_match": True, "bpb": False}
    assert json.loads(base_on.items_path.read_text())["top"] == ["world_gsm", "world_mc"]
    assert SUFFIX not in base_on.results_path.read_text() + base_on.samples_path.read_text()


def test_likelihood_off_reports_no_bpb_anywhere(base_off):
    assert not any(k.endswith("/bpb") for k in base_off.metrics)
    assert "bpb" not in json.loads(base_off.items_path.read_text())["scores"]["world_gsm"]
    assert not any("request" in r for r in read_jsonl(base_off.samples_path))


def test_bpb_is_lower_is_better_and_the_average_is_not():
    assert higher_is_better(BPB) is False
    assert higher_is_better("eval/avg") is True
    assert higher_is_better("eval/world_gsm/exact_match") is True


def test_companion_reads_the_few_shot_prompt_its_task_reads(tmp_path):
    """Three shots, no model: the companion's context is the task's, and its continuation the gold solution."""
    cfg = small_config(tmp_path, evaluation={"num_fewshot": 3})
    specs = resolve_tasks(["world_gsm"])
    (task,) = _load_tasks(specs, "base", cfg, task_manager(specs))
    (gold,) = companions([task])
    for t in (task, gold):
        t.set_fewshot_seed(seed=1234)
        t.build_all_requests(limit=3)
    for asked, scored in zip(task.instances, gold.instances, strict=True):
        context, continuation = scored.args
        assert context + "\n" == asked.args[0] and context.count("\n####") == 3
        assert continuation == "\n" + asked.doc["solution"]


def test_gold_targets_name_fields_the_installed_lm_eval_tasks_have():
    """gsm8k's documents have `answer`, gsm8k_cot's hand-written shots `target`; MATH's `solution`."""
    from lm_eval.utils import apply_template

    tasks = Path(__import__("lm_eval.tasks", fromlist=["x"]).__file__).parent
    cot = yaml.safe_load((tasks / "gsm8k" / "gsm8k-cot.yaml").read_text())
    shot = cot["fewshot_config"]["samples"][0]
    assert apply_template(GOLD_TARGETS["gsm8k_cot"], shot) == shot["target"]
    assert apply_template(GOLD_TARGETS["gsm8k"], {"question": "q", "answer": "a\n#### 1"}) == "a\n#### 1"
    assert "{{answer}}" in (tasks / "gsm8k" / "gsm8k.yaml").read_text()
    members = yaml.safe_load((tasks / "benchmarks" / "minerva_math.yaml").read_text())["task"]
    assert {t for t in GOLD_TARGETS if t.startswith("minerva_math")} == set(members)
    assert '"solution": doc["solution"]' in (tasks / "minerva_math" / "utils.py").read_text()  # kept by process_docs


def test_fold_puts_a_group_members_bpb_on_the_member_and_the_group_average_ignores_it():
    """No model: simple_evaluate's shape for a group (minerva_math) run beside its members' companions."""
    from flywheel.evaluation.items import item_scores
    from flywheel.evaluation.likelihood import fold
    from flywheel.metrics import flatten_results

    def sample(doc_id: int, metric: str, value: float) -> dict:
        return {"doc_id": doc_id, "arguments": [["Problem: ...", " gold"]], "filter": "none", "metrics": [metric],
                metric: value}

    members = ("minerva_math_algebra", "minerva_math_geometry")
    results = {
        "results": {m: {"alias": m, "exact_match,none": 0.5} for m in members}
        | {f"{m}{SUFFIX}": {"alias": m, "bpb,none": 1.0 + i, "bpb_stderr,none": "N/A"} for i, m in enumerate(members)},
        "groups": {"minerva_math": {"exact_match,none": 0.5}},
        "group_subtasks": {"minerva_math": list(members)},
        "higher_is_better": {m: {"exact_match": True} for m in members} | {f"{m}{SUFFIX}": {"bpb": False} for m in members},
        "versions": {f"{m}{SUFFIX}": 3.1 for m in members},
        "samples": {m: [sample(0, "exact_match", 1.0), sample(1, "exact_match", 0.0)] for m in members}
        | {f"{m}{SUFFIX}": [sample(0, "bpb", 1.0 + i), sample(1, "bpb", 1.0 + i)] for i, m in enumerate(members)},
    }
    fold(results, {f"{m}{SUFFIX}": m for m in members})
    flat = flatten_results(results)
    assert flat["eval/minerva_math_algebra/bpb"] == 1.0 and flat["eval/minerva_math_geometry/bpb"] == 2.0
    assert "eval/minerva_math/bpb" not in flat and flat["eval/avg"] == 0.5  # the group's exact_match alone
    assert results["higher_is_better"]["minerva_math_algebra"] == {"exact_match": True, "bpb": False}
    assert results["versions"] == {} and all(SUFFIX not in name for name in results["samples"])
    items = item_scores(results, {})
    assert items["top"] == ["minerva_math"] and items["scores"]["minerva_math_geometry"]["bpb"] == {"0": 2.0, "1": 2.0}
    pooled = metric_terms(items, "eval/minerva_math/bpb")  # the group's bpb: its members' items, pooled
    assert pooled == {("minerva_math_algebra", "bpb"): 0.5, ("minerva_math_geometry", "bpb"): 0.5}
    assert metric_terms(items, "eval/avg") == {("minerva_math_algebra", "exact_match"): 0.5,
                                               ("minerva_math_geometry", "exact_match"): 0.5}

"""Token-level measures on hand-made sequences: the classes, the answer span, the δ-thirds, the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.ablation.oracle import oracle_logprobs
from flywheel.ablation.token_report import differences, token_summary
from flywheel.ablation.tokens import (
    BUCKETS,
    CLASSES,
    answer_mask,
    centred_delta,
    classify,
    delta_buckets,
    group_means,
    heldout_tokens,
    measures,
    pieces,
)
from flywheel.metrics import AVG

from .conftest import byte_tokenizer

SOLVED = "What is 12 + 30?\n12 + 30 = 42\n#### 42"


def labelled(text: str, tok=None) -> list[tuple[str, str]]:
    """(token text, class) of every token of `text` followed by end of document."""
    tok = tok or byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [(tok.decode([i]), CLASSES[c]) for i, c in zip(ids, classify(ids, pieces(tok)), strict=True)]


def test_a_solved_problem_splits_into_answer_digit_operator_and_prose_tokens():
    tokens = labelled(SOLVED)
    marker = max(i for i, (text, _) in enumerate(tokens) if "#" in text)
    after = [(t, c) for t, c in tokens[marker + 1:] if t.strip() and t != "<|eos|>"]
    assert "".join(t for t, _ in after).strip() == "42" and {c for _, c in after} == {"answer"}
    before = tokens[: marker + 1]
    line = "".join(t for t, _ in before).split("\n")[1]
    assert line == "12 + 30 = 42"
    digits = [(t.strip(), c) for t, c in before if any(ch.isdigit() for ch in t)]
    operands, computed = digits[:-len([d for d in digits if d[1] == "result"])], [d for d in digits if d[1] == "result"]
    assert "".join(t for t, _ in computed) == "42"  # right of `=`: a computed value
    assert "".join(t for t, _ in operands) == "12301230" and {c for _, c in operands} == {"digit"}
    assert {c for t, c in before if t.strip() in ("+", "=")} == {"operator"}
    assert {c for t, c in before if t.strip() in ("What", "is", "?", "#")} <= {"prose"}
    assert tokens[-1] == ("<|eos|>", "prose")


def test_the_answer_marker_split_into_single_hashes_still_marks_the_answer():
    tok = byte_tokenizer()
    ids = tok("#### 7", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3 and all("####" not in tok.decode([i]) for i in ids)  # this tokenizer splits the marker
    assert [c for t, c in labelled("#### 7", tok) if t.strip() == "7"] == ["answer"]


def test_an_answer_ends_at_its_line_break_and_at_the_end_of_the_document():
    tokens = labelled("#### 5\n6 + 7")
    assert [c for t, c in tokens if t.strip() == "5"] == ["answer"]
    assert [c for t, c in tokens if t.strip() == "6"] == ["digit"]  # the next line is not an answer
    tok = byte_tokenizer()
    two_docs = (tok("#### 8", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                + tok("9", add_special_tokens=False)["input_ids"])
    codes = classify(two_docs, pieces(tok))
    assert CLASSES[codes[-1]] == "digit"  # the end of document closes the answer span
    assert answer_mask(two_docs, pieces(tok)).sum() == 1


def test_delta_is_centred_per_document_so_a_constant_offset_changes_no_bucket():
    ref = [np.array([-1.0, -2.0, -3.0]), np.array([-10.0, -11.0, -12.0])]
    base = [np.array([-2.0, -2.0, -2.0]), np.array([-1.0, -1.0, -1.0])]
    delta = centred_delta(ref, base)
    np.testing.assert_allclose(delta, [1, 0, -1, 1, 0, -1])
    np.testing.assert_array_equal(delta_buckets(delta), [0, 1, 2, 0, 1, 2])  # top, middle, bottom
    shifted = centred_delta([r + 5 for r in ref], base)
    np.testing.assert_array_equal(delta_buckets(shifted), delta_buckets(delta))


def test_buckets_cut_pooled_tokens_into_thirds():
    delta = np.arange(9, dtype=float)
    assert [int((delta_buckets(delta) == b).sum()) for b in range(3)] == [3, 3, 3]
    assert delta_buckets(delta)[-1] == 0 and delta_buckets(delta)[0] == 2


def test_measures_average_the_loss_of_each_class_and_third():
    tok = byte_tokenizer()
    held = heldout_tokens([SOLVED, "the quick fox"], tok)
    lp = []
    for ids in held.ids:
        lp.append(-np.arange(1, len(ids), dtype=float))  # NLL of target t is t (1-based within its document)
    nll = np.concatenate([-x for x in lp])
    buckets = {"rl": delta_buckets(np.arange(held.n_tokens, dtype=float))}
    out = measures(lp, held, buckets)
    assert out["tokens"] == held.n_tokens and out["all"] == pytest.approx(nll.mean())
    for i, name in enumerate(CLASSES):
        assert out["classes"][name] == pytest.approx(nll[held.classes == i].mean())
    for i, name in enumerate(BUCKETS):
        assert out["buckets"]["rl"][name] == pytest.approx(nll[buckets["rl"] == i].mean())
    assert group_means(np.ones(2), np.array([0, 0]), ("a", "b")) == {"a": 1.0, "b": None}


def test_the_results_oracle_is_certain_of_computed_values_and_answers_not_operands():
    tok = byte_tokenizer()
    ids = tok("7 + 5 = 12\n#### 12", add_special_tokens=False)["input_ids"]
    text = [tok.decode([i]) for i in ids]
    answers, results = answer_mask(ids, pieces(tok)), answer_mask(ids, pieces(tok), "results")
    assert "".join(t for t, m in zip(text, answers, strict=True) if m).strip() == "12"
    assert "".join(t for t, m in zip(text, results, strict=True) if m).replace(" ", "") == "1212"


def test_the_oracle_is_certain_of_answer_tokens_only():
    lp = np.array([-1.0, -2.0, -3.0, -4.0])
    out = oracle_logprobs(lp, np.array([False, True, False, True]))
    np.testing.assert_array_equal(out, [-1.0, 0.0, -3.0, 0.0])
    assert lp[1] == -2.0  # the reference's own numbers are not changed in place


def _cell(variant: str, seed: int, answer: list[float], avg: float) -> dict:
    curve = [{"tokens": 100 * (i + 1), "metrics": {AVG: avg} if i == len(answer) - 1 else {},
              "token_nll": {"all": a, "classes": {"answer": a, "result": 1.0, "digit": 1.0, "operator": 1.0,
                                                  "prose": 1.0},
                            "buckets": {"rl": {"top": a, "middle": 1.0, "bottom": 2.0}}}}
             for i, a in enumerate(answer)]
    return {"variant": variant, "seed": seed, "curve": curve}


def test_each_variant_is_paired_by_seed_with_the_ntp_run_of_its_own_length():
    variants, references = ["ntp", "remit_noclip", "ntp_5x", "remit_noclip_5x"], {"rl": "/ref"}
    cells = [_cell("ntp", 0, [2.0, 1.5], 0.30), _cell("ntp", 1, [2.0, 1.7], 0.32),
             _cell("remit_noclip", 0, [1.9, 1.2], 0.31), _cell("remit_noclip", 1, [1.9, 1.3], 0.35),
             _cell("ntp_5x", 0, [1.0, 0.5], 0.5), _cell("remit_noclip_5x", 0, [1.0, 0.4], 0.5)]
    rows = {r["variant"]: r for r in differences(variants, references, cells)}
    assert set(rows) == {"remit_noclip", "remit_noclip_5x"}
    assert rows["remit_noclip_5x"]["baseline"] == "ntp_5x" and rows["remit_noclip_5x"]["seeds"] == [0]
    end = rows["remit_noclip"]["points"][-1]
    assert end["answer"]["diff"]["values"] == pytest.approx([-0.3, -0.4])  # seed by seed, same seed paired
    assert end["avg"]["diff"]["values"] == pytest.approx([0.01, 0.03])
    assert end["top"]["diff"]["mean"] == pytest.approx(-0.35)
    assert "avg" not in rows["remit_noclip"]["points"][0]  # accuracy only where it was scored
    base = {"token_nll": cells[0]["curve"][0]["token_nll"]}
    summary = token_summary(variants, references, base, cells)
    assert summary["curves"]["remit_noclip"]["points"][-1]["answer"]["mean"] == pytest.approx(1.25)
    assert summary["curves"]["ntp"]["role"] == "rl"

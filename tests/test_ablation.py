"""The ablation harness: a smoke study end to end, and its statistics on numbers worked out by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flywheel.ablation import cell_config, cell_seeds, failed_cell, heldout_kl, prepare_ablation
from flywheel.ablation.cell import snapshot_steps
from flywheel.ablation.miniplm import document_gaps, select_documents, top_documents
from flywheel.ablation.plan import AblationPlan
from flywheel.ablation.report import summarize
from flywheel.ablation.stats import (
    compare,
    format_estimate,
    format_ratio,
    holm,
    mean_ci,
    tokens_ratio,
    tokens_to_reach,
)
from flywheel.data.io import read_jsonl
from flywheel.errors import FlywheelError
from flywheel.metrics import AVG

from .conftest import small_config

# ntp and remit as the brief's smoke asks, plus remit under a second name: with the config's
# epsilon of 0.2, `remit_eps0.2` is the very same variant, so the harness must call them equal.
SMOKE_VARIANTS = ["ntp", "remit", "remit_eps0.2"]


@pytest.fixture(scope="module")
def smoke(request) -> Iterator[dict]:
    """One smoke ablation through the library function: 4,096 tokens, 2 seeds, 2 SFT steps, 5 eval items."""
    import torch

    from flywheel.ablation import run_ablation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the smoke size does, and before the world builds (~10x faster, busy box)
    try:
        cfg, _ = request.getfixturevalue("small_world")
        yield run_ablation(cfg, variants=SMOKE_VARIANTS, size="smoke", echo=False)
    finally:
        torch.set_num_threads(threads)  # give the other test modules torch's default back


# --- the smoke study -----------------------------------------------------------------------------


def test_smoke_ablation_tables_every_variant_and_seed_in_both_phases(smoke):
    assert not smoke["failed"]
    assert smoke["seeds"] == [0, 1]
    for phase in ("mid", "post"):
        assert list(smoke["phases"][phase]) == SMOKE_VARIANTS
        for variant, row in smoke["phases"][phase].items():
            assert row["seeds"] == [0, 1], (phase, variant)
            for metric in ("eval/world_gsm/exact_match", "eval/world_mc/acc", AVG):
                assert row[metric]["n"] == 2 and row[metric]["ci95"] is not None, (phase, variant, metric)
    cells = {(c["variant"], c["seed"]) for c in smoke["cells"]}
    assert cells == {(v, s) for v in SMOKE_VARIANTS for s in (0, 1)}
    for variant in SMOKE_VARIANTS:
        assert smoke["kl_to_reference"][variant]["n"] == 2
        assert all(math.isfinite(x) and x >= 0 for x in smoke["kl_to_reference"][variant]["values"])


def test_smoke_ablation_scores_a_curve_from_the_base_to_the_full_budget(smoke):
    curve = smoke["curves"][AVG]["remit"]
    assert [p["tokens"] for p in curve] == [0, 2048, 4096]  # base, half the budget, the end (8 steps of 512)
    assert set(smoke["tokens_to_baseline"]) == {"remit", "remit_eps0.2"}
    entry = smoke["tokens_to_baseline"]["remit"]
    assert entry["target"] == pytest.approx(smoke["curves"][AVG]["ntp"][-1]["mean"])
    if entry["reached"]:
        assert 0 <= entry["ratio"] <= 1 and entry["tokens"] == pytest.approx(entry["ratio"] * 4096)
    else:
        assert entry["ratio"] is None and entry["tokens"] is None


def test_smoke_ablation_writes_json_markdown_plot_and_one_mlflow_child_per_cell(smoke, small_world):
    from flywheel.tracking.store import PARENT_TAG, open_tracker

    files = smoke["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["phases"] == smoke["phases"]
    markdown = Path(files["markdown"]).read_text()
    for variant in SMOKE_VARIANTS:
        assert f"| {variant} | 2 |" in markdown
    assert "| pre-anneal base | few-shot |" in markdown and "| rl reference | zero-shot, chat |" in markdown
    assert Path(files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tracker = open_tracker(small_world[0])
    parent = smoke["plan"]["parent_run"]
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
    expected = sorted(f"{v}/seed-{s}" for v in SMOKE_VARIANTS for s in (0, 1))
    assert sorted(r.info.run_name for r in children) == expected
    assert all(r.info.status == "FINISHED" for r in children)
    metrics = tracker.client.get_run(parent).data.metrics
    assert "mid/remit/avg_mean" in metrics and "reference/rl/avg" in metrics  # the guide is scored too


def test_smoke_ablation_reports_heldout_loss_by_token_class_along_the_anneal(smoke):
    curves = smoke["tokens"]["curves"]
    assert [p["tokens"] for p in curves["remit"]["points"]] == [0, 2048, 4096]
    for variant in SMOKE_VARIANTS:
        end = curves[variant]["points"][-1]
        assert end["answer"]["n"] == 2 and end["top"]["n"] == 2 and end["all"]["mean"] > 0
    rows = {r["variant"]: r for r in smoke["tokens"]["differences"]}
    assert set(rows) == {"remit", "remit_eps0.2"} and rows["remit"]["baseline"] == "ntp"
    assert rows["remit"]["points"][-1]["answer"]["diff"] == rows["remit_eps0.2"]["points"][-1]["answer"]["diff"]
    markdown = Path(smoke["files"]["markdown"]).read_text()
    assert "## Held-out loss by token class and δ-third" in markdown and "| remit | ntp | 2 |" in markdown
    assert Path(smoke["files"]["token_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_variants_are_reported_as_not_significantly_different(smoke):
    by_cell = {(c["variant"], c["seed"]): c for c in smoke["cells"]}
    for seed in (0, 1):
        assert by_cell[("remit", seed)]["post"] == by_cell[("remit_eps0.2", seed)]["post"]
    for phase in ("mid", "post"):
        pairs = {(r["a"], r["b"]): r for r in smoke["comparisons"][phase]}
        assert set(pairs) == {("remit", "ntp"), ("remit", "remit_eps0.2"), ("remit_eps0.2", "ntp")}
        row = pairs[("remit", "remit_eps0.2")]
        assert row["test"] == "paired t"
        assert row["diff"] == 0 and row["p_value"] == 1.0 and not row["significant"]
        assert row["p_holm"] == 1.0 and not row["significant_holm"]
        assert pairs[("remit", "ntp")]["diff"] == pytest.approx(pairs[("remit_eps0.2", "ntp")]["diff"])


def test_a_failed_cell_is_listed_and_the_table_is_still_made(smoke):
    ok = [c for c in smoke["cells"] if not (c["variant"] == "remit" and c["seed"] == 1)]
    crashed = failed_cell("remit", 1, RuntimeError("out of memory"))
    report = summarize(AblationPlan.from_json(smoke["plan"]), smoke["base"], [*ok, crashed])
    assert report["failed"][0]["error"] == "RuntimeError: out of memory"
    assert report["phases"]["mid"]["remit"]["seeds"] == [0]
    assert report["phases"]["mid"]["remit"][AVG]["ci95"] is None  # one seed left: no interval
    assert "± n/a" in report["markdown"] and "failed: remit seed 1" in report["markdown"]


def test_kl_of_a_model_to_itself_is_zero_and_to_the_reference_is_positive(smoke, small_world):
    cfg, report = small_world
    texts = ["What is 2 + 3?\n2 + 3 = 5\n#### 5", "What is 40 - 12?\n40 - 12 = 28\n#### 28"]
    assert heldout_kl(cfg, report.paths.base, report.paths.base, texts) == pytest.approx(0.0, abs=1e-6)
    assert heldout_kl(cfg, report.paths.base, smoke["references"]["rl"], texts) > 0


# --- statistics on fixed numbers -----------------------------------------------------------------


def test_mean_ci_uses_the_t_distribution_hand_computed():
    # [1, 2, 3]: mean 2, s = 1, se = 1/sqrt(3) = 0.577350; t(0.975, df 2) = 4.302653 -> 2.484138
    est = mean_ci([1.0, 2.0, 3.0])
    assert est.mean == pytest.approx(2.0)
    assert est.ci95 == pytest.approx(2.484138, abs=1e-6)
    assert (est.low, est.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)
    # [0.2, 0.4]: mean 0.3, s = 0.141421, se = 0.1; t(0.975, df 1) = 12.706205 -> 1.2706205
    assert mean_ci([0.2, 0.4]).ci95 == pytest.approx(1.2706205, abs=1e-6)
    one = mean_ci([0.25])
    assert (one.mean, one.ci95, one.n) == (0.25, None, 1)
    assert format_estimate(one) == "25.0 ± n/a"
    assert format_estimate(mean_ci([0.1, 0.2, 0.3])) == "20.0 ± 24.8"


def test_compare_says_equal_for_identical_numbers_and_different_for_separated_ones():
    same = compare([0.3, 0.5, 0.4], [0.3, 0.5, 0.4], paired=True)
    assert (same.diff, same.p_value, same.significant) == (0.0, 1.0, False)
    # paired differences 0.10, 0.12, 0.11: mean 0.11, s 0.01, t = 0.11 / (0.01/sqrt 3) = 19.05, df 2
    # -> two-sided p = 0.00274
    paired = compare([0.40, 0.62, 0.51], [0.30, 0.50, 0.40], paired=True)
    assert paired.p_value == pytest.approx(0.002744, abs=2e-5) and paired.significant
    # Welch on 1..5 vs 6..10: t = -5, df 8 -> p = 0.001053
    welch = compare([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], paired=False)
    assert welch.test == "Welch t" and welch.significant
    assert welch.p_value == pytest.approx(0.001053, abs=2e-6)
    noisy = compare([0.2, 0.4, 0.3], [0.3, 0.2, 0.35], paired=True)
    assert not noisy.significant
    assert compare([0.5], [0.4], paired=True).p_value is None  # one seed: no test, not significant


def test_holm_adjusts_p_values_hand_computed():
    # sorted 0.01, 0.02, 0.04 (m = 3): 3*0.01 = 0.03, max(0.03, 2*0.02 = 0.04) = 0.04, max(0.04, 1*0.04) = 0.04
    adjusted = holm([0.04, 0.01, None, 0.02])
    assert [p for p, _ in adjusted] == pytest.approx([0.04, 0.03, None, 0.04])
    assert [sig for _, sig in adjusted] == [True, True, False, True]
    # 0.03 alone is significant; among four tests 4 * 0.03 = 0.12 is not
    assert holm([0.03]) == [(pytest.approx(0.03), True)]
    assert holm([0.03, 0.5, 0.6, 0.7])[0] == (pytest.approx(0.12), False)
    assert holm([0.9, 0.8])[0] == (1.0, False)  # capped at 1


def test_tokens_to_baseline_interpolates_on_a_fixed_curve():
    ntp = [(0, 0.10), (100, 0.20), (200, 0.25), (300, 0.30)]
    remit = [(0, 0.10), (100, 0.24), (200, 0.33), (300, 0.36)]
    # NTP's final 0.30 is crossed between (100, 0.24) and (200, 0.33): 100 + 0.06/0.09 * 100 = 166.67
    entry = tokens_ratio(remit, ntp)
    assert entry["tokens"] == pytest.approx(166.6667, abs=1e-3)
    assert entry["ratio"] == pytest.approx(0.555556, abs=1e-6)
    assert format_ratio(entry) == "0.56× (167 of 300 tokens)"
    never = tokens_ratio([(0, 0.10), (150, 0.20), (300, 0.29)], ntp)
    assert never["reached"] is False and never["ratio"] is None and format_ratio(never) == "not reached"
    assert tokens_to_reach([(0, 0.4), (300, 0.5)], 0.3) == 0  # already there at the first point
    assert tokens_ratio(ntp, ntp)["ratio"] == pytest.approx(1.0)


def test_snapshot_steps_fall_on_fractions_of_the_run():
    assert snapshot_steps(8, [0.5, 1.0]) == {4: 0.5}
    assert snapshot_steps(9, [1 / 3, 2 / 3, 1.0]) == {3: 1 / 3, 6: 2 / 3}
    assert snapshot_steps(2, [1 / 3, 2 / 3, 1.0]) == {1: 1 / 3}  # 1.33 rounds to the end: one point fewer


# --- MiniPLM selection ---------------------------------------------------------------------------


def test_miniplm_keeps_exactly_the_top_80_percent_of_documents_by_gap():
    # Ten documents, one per row of 4 tokens; column 0 has no context, so its huge gap must be ignored.
    gaps = [0.5, -1.0, 2.0, 0.1, -0.3, 1.5, 0.0, -2.0, 0.7, 0.2]
    doc_ids = np.repeat(np.arange(10), 4).reshape(10, 4)
    base = np.zeros((10, 4), dtype=np.float32)
    ref = np.zeros((10, 4), dtype=np.float32)
    ref[:, 0] = 100.0
    for d, g in enumerate(gaps):  # per-token gaps g-1, g, g+1: mean g
        ref[d, 1:] = [g - 1, g, g + 1]
    got = document_gaps(ref, base, doc_ids)
    assert [got[d] for d in range(10)] == pytest.approx(gaps)
    assert top_documents(got, 0.8) == [0, 2, 3, 4, 5, 6, 8, 9]  # drops -2.0 (doc 7) and -1.0 (doc 1)
    # A document split over two rows: the second row's first token (no context) is left out.
    split = np.array([[0, 0, 1, 1], [1, 1, 2, 2]])
    lp = np.array([[9.0, 1.0, 9.0, 3.0], [9.0, 5.0, 9.0, 2.0]])
    assert document_gaps(lp, np.zeros_like(lp), split) == pytest.approx({0: 1.0, 1: 4.0, 2: 2.0})


def test_miniplm_selection_writes_the_top_documents_of_the_real_mixture(smoke, small_world):
    cfg, report = small_world
    plan = prepare_ablation(cfg, ["miniplm"], 1, size="smoke")
    cell_cfg = cell_config(plan, "miniplm", 0)
    sel = select_documents(cell_cfg, str(report.paths.base), smoke["references"]["rl"], keep=0.8)
    rows = read_jsonl(sel.path)
    assert sel.kept == math.floor(0.8 * sel.documents + 0.5)
    assert len(rows) == sel.kept and all(r["text"].strip() for r in rows)
    assert min(r["gap"] for r in rows) == pytest.approx(sel.threshold)
    assert len({r["doc"] for r in rows}) == sel.kept
    assert np.isfinite([r["gap"] for r in rows]).all()


def test_unknown_variants_and_sizes_fail_with_one_clear_sentence(tmp_path):
    cfg = small_config(tmp_path, model={"source": str(tmp_path)})
    with pytest.raises(FlywheelError, match="unknown remit_eps9; choose from ntp, remit"):
        prepare_ablation(cfg, ["remit_eps9"])
    with pytest.raises(FlywheelError, match="size: must be one of smoke, full, config"):
        prepare_ablation(cfg, ["ntp"], size="huge")


def test_the_prefect_flow_runs_one_retried_task_per_cell():
    from flows.ablation import cell_task, flywheel_ablation

    assert flywheel_ablation.name == "flywheel-ablation"
    assert cell_task.retries == 2 and cell_task.name == "ablation-cell"


# the paper's open questions as variants: centring, weight mapping, and the reference's source
OPEN_QUESTIONS = ["ntp", "remit_zscore", "remit_exp", "remit_linear", "remit_dpo_ref", "remit_eps0.2",
                  "remit_frozen_eps0.2"]


def test_smoke_ablation_runs_the_centring_mapping_dpo_reference_and_frozen_delta_variants(small_world):
    import torch

    from flywheel.ablation import run_ablation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study = run_ablation(small_world[0], variants=OPEN_QUESTIONS, seeds=1, size="smoke", echo=False)
    finally:
        torch.set_num_threads(threads)
    assert not study["failed"]
    assert list(study["phases"]["post"]) == OPEN_QUESTIONS
    plan = study["plan"]
    assert "dpo" in plan["bootstrapped"] and plan["references"]["dpo"] not in (None, plan["references"]["rl"])
    cells = {c["variant"]: c for c in study["cells"]}
    assert cells["remit_dpo_ref"]["reference"] == plan["references"]["dpo"]
    rules = {"remit_zscore": "2·sigmoid((δ − mean δ) / std δ)", "remit_exp": "exp(δ − mean δ)",
             "remit_linear": "1 + (δ − mean δ)"}
    weights = {}
    for variant, rule in rules.items():
        run_dir = Path(cells[variant]["midtrain_checkpoint"]).parent
        assert rule in (run_dir / "remit-weights.html").read_text(), variant  # the weight page names the rule
        weights[variant] = (Path(cells[variant]["midtrain_checkpoint"]) / "model.safetensors").read_bytes()
    assert len(set(weights.values())) == 3  # each rule trained a different model
    frozen_dir = Path(cells["remit_frozen_eps0.2"]["midtrain_checkpoint"]).parent
    assert "δ against the frozen base" in (frozen_dir / "remit-weights.html").read_text()
    live_dir = Path(cells["remit_eps0.2"]["midtrain_checkpoint"]).parent
    assert (frozen_dir / "model" / "model.safetensors").read_bytes() != (live_dir / "model" / "model.safetensors"
                                                                         ).read_bytes()
    # frozen δ is read against the live δ of the same cell, besides NTP
    pairs = {(c["a"], c["b"]) for c in study["comparisons"]["post"]}
    assert {("remit_frozen_eps0.2", "remit_eps0.2"), ("remit_frozen_eps0.2", "ntp")} <= pairs


def test_the_dose_study_plans_its_grid_and_refuses_a_missing_strong_reference(small_world):
    cfg, report = small_world
    with pytest.raises(FlywheelError, match="--strong-reference: the variants guided by the strong reference"):
        prepare_ablation(cfg, size="smoke", study="dose")
    with pytest.raises(FlywheelError, match="kd not in study dose"):
        prepare_ablation(cfg, ["kd"], size="smoke", study="dose")
    plan = prepare_ablation(cfg, size="smoke", study="dose", seeds=4, strong_reference=str(report.paths.base))
    assert plan.posttrain is False and plan.accuracy_points == "end" and plan.kind == "dose"
    assert len(plan.variants) == 16 and plan.variants[:2] == ["remit_oracle_noclip", "remit_oracle_results_noclip"]
    assert cell_seeds(plan, "remit_noclip") == [0, 1, 2, 3] and cell_seeds(plan, "remit_noclip_5x") == [0, 1, 2]
    long, short = cell_config(plan, "remit_strong_eps0.5_5x", 0), cell_config(plan, "ntp", 0)
    assert long.midtrain.token_budget == 5 * short.midtrain.token_budget and long.midtrain.epsilon == 0.5
    assert Path(plan.token_heldout).is_file()
    fresh = cfg.model_copy(update={"home": cfg.home.parent / "never-built"})
    with pytest.raises(FlywheelError, match="configs/strong-reference.yaml builds one"):
        prepare_ablation(fresh, size="smoke", study="strong")
    assert not fresh.home.exists()  # refused before the world was built
    strong = prepare_ablation(cfg, size="smoke", study="strong", strong_reference=str(report.paths.base))
    assert len(strong.variants) == 11 and strong.posttrain is False
    frozen = cell_config(strong, "remit_strong_frozen_noclip", 0).midtrain
    assert frozen.delta_base == "frozen" and frozen.epsilon is None


def test_the_oracle_cell_anneals_on_a_cache_certain_of_every_answer_and_measures_token_classes(small_world):
    """The positive control's plumbing at smoke size: the oracle cache differs from the RL one exactly on
    answer tokens (set to log 1), the anneal reads it, and every point has held-out loss per class."""
    import torch

    from flywheel.ablation import evaluate_base, resolve_references, run_cell, tokens
    from flywheel.models import load_tokenizer
    from flywheel.remit.scoring import score_reference

    cfg = small_world[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = resolve_references(prepare_ablation(cfg, ["remit_oracle_noclip", "ntp"], seeds=1, size="smoke",
                                                   study="dose"))
        base = evaluate_base(plan)
        cell = run_cell(plan, "remit_oracle_noclip", 0)
    finally:
        torch.set_num_threads(threads)
    oracle, rl = plan.references["oracle"], plan.references["rl"]
    assert cell["reference"] == oracle and oracle != rl
    cell_cfg = cell_config(plan, "remit_oracle_noclip", 0)
    source, derived = score_reference(cell_cfg, rl), score_reference(cell_cfg, oracle)  # both finished: reused
    assert derived.cache.index["oracle_of"] == rl and derived.cache.index["answer_tokens"] > 0
    table = tokens.pieces(load_tokenizer(cell_cfg))
    packed = source.corpus.load()
    changed = 0
    for row in range(min(64, len(packed))):
        mask = tokens.answer_mask(np.asarray(packed.input_ids[row]), table)
        mine, theirs = derived.cache.rows(row), source.cache.rows(row)
        assert (mine[mask] == 0).all() and (mine[~mask] == theirs[~mask]).all()
        changed += int(mask.sum())
    assert changed > 0
    assert cell["post"] == {} and cell["post_checkpoint"] is None  # the dose study skips post-training
    assert [bool(p["metrics"]) for p in cell["curve"]] == [False, True]  # accuracy at the end only
    for point in [base, *cell["curve"]]:
        nll = point["token_nll"]
        assert nll["tokens"] > 1000 and all(nll["classes"][c] > 0 for c in tokens.CLASSES)
        assert set(nll["buckets"]) == {"rl", "oracle"}

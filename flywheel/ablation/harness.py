"""The ablation harness: the paper's comparisons re-run on your base, reference and data.

From one pre-anneal base and one RL reference, every selected variant is mid-trained on the
same mixture, token budget and seeds, evaluated at fractions of the budget (checkpoints of the
same run, saved on the way), post-trained with the config's chain and evaluated again. Then
`report.summarize` turns the cells into tables with 95% CIs, tokens-to-baseline, KL to the
reference and a plot.

The steps are plain functions so Prefect can run each (variant, seed) cell as its own task:
    plan = prepare_ablation(cfg, ...)      # resolve paths, size, variants, seeds (cheap)
    plan = resolve_references(plan)         # bootstrap missing references; open the MLflow parent run
    base = evaluate_base(plan)              # the 0-token point every curve starts from
    cell = run_cell(plan, variant, seed)    # one cell: mid-train, evaluate along, KL, post-train, evaluate
    report = finish_ablation(plan, base, cells)
`run_ablation` does all of it in one call, a crashed cell recorded as failed, not fatal.

Seeds change `cfg.seed` only: the mixture's document order, the data order and post-training's
sampling. The base is the same folder for every cell (world references are resolved to paths
before the seed changes, since the tiny world's folders are named by seed).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig, validate_config
from flywheel.data.io import atomic_dir, fingerprint, read_jsonl
from flywheel.errors import FlywheelError

ABLATION_VERSION = 1
ABLATION_TAG = "flywheel.ablation"
VARIANT_TAG = "flywheel.variant"
SEED_TAG = "flywheel.seed"
FRACTIONS = (1 / 3, 2 / 3, 1.0)
MINIPLM_KEEP = 0.8


@dataclass
class Variant:
    """One row of the tables: an objective, which reference guides it, and any other mid-training change."""

    objective: str
    reference: str | None = "rl"  # rl | sft | weak | dpo | strong | oracle | oracle_results; None: unguided
    midtrain: dict[str, Any] = field(default_factory=dict)
    miniplm: bool = False
    about: str = ""
    baseline: str = "ntp"  # the NTP variant it is paired with (same token budget)
    budget_scale: int = 1  # the anneal's length as a multiple of the size's token budget
    max_seeds: int | None = None  # run only the study's first this-many seeds (the costly cells)


VARIANTS: dict[str, Variant] = {
    "ntp": Variant("ntp", None, about="plain next-token prediction (the standard anneal)"),
    "remit": Variant("remit", about="ReMiT guided by the RL reference, the config's epsilon"),
    "kd": Variant("kd", midtrain={"reference_mode": "online"},
                  about="forward-KL distillation from the RL reference"),
    "rho1": Variant("rho1", about="Rho-1: keep the top rho1_keep tokens by excess loss"),
    "miniplm": Variant("ntp", None, miniplm=True,
                       about="MiniPLM-style: NTP on the 80% of documents with the largest ref-base gap"),
    "remit_sft_ref": Variant("remit", "sft", about="ReMiT guided by the SFT checkpoint, not the RL one"),
    "remit_weak_ref": Variant("remit", "weak", about="ReMiT guided by an early RL checkpoint"),
    "remit_eps0.1": Variant("remit", midtrain={"epsilon": 0.1}, about="ReMiT, clip epsilon 0.1"),
    "remit_eps0.2": Variant("remit", midtrain={"epsilon": 0.2}, about="ReMiT, clip epsilon 0.2"),
    "remit_eps0.3": Variant("remit", midtrain={"epsilon": 0.3}, about="ReMiT, clip epsilon 0.3"),
    "remit_noclip": Variant("remit", midtrain={"epsilon": None}, about="ReMiT without the clip"),
    "remit_zscore": Variant("remit", midtrain={"centring": "zscore"},
                            about="ReMiT, delta centred and divided by its per-sequence std (z-score)"),
    "remit_exp": Variant("remit", midtrain={"mapping": "exp"}, about="ReMiT, weight exp(centred delta), same clip"),
    "remit_linear": Variant("remit", midtrain={"mapping": "linear"},
                            about="ReMiT, weight 1 + centred delta, same clip"),
    "remit_dpo_ref": Variant("remit", "dpo", about="ReMiT guided by a DPO-only post-training of the NTP anneal"),
    "remit_eps0.5": Variant("remit", midtrain={"epsilon": 0.5}, about="ReMiT, clip epsilon 0.5"),
}

# The dose-response study (`flywheel ablate --study dose`): clip ε × reference × anneal length, NTP at each
# length, and the positive control. `strong` is a reference far better at the tasks (the tiny world's
# post-trained `micro`, passed as --strong-reference); `oracle` is the RL reference made certain of every
# final answer, `oracle_results` of every computed value as well (flywheel/ablation/oracle.py).
LONG = 5  # the long anneal: 5× the size's budget (the full size: 200k → 1M tokens)
DOSE_EPSILONS = {"eps0.2": 0.2, "eps0.5": 0.5, "noclip": None}
DOSE_LONG_SEEDS = 3  # the long cells' seeds (a cap, so a user short of time can run two)


def _dose_variants() -> dict[str, Variant]:
    out: dict[str, Variant] = {"ntp_5x": Variant("ntp", None, budget_scale=LONG, baseline="ntp_5x",
                                                 about="NTP, anneal 5× as long (full size: 1M tokens)",
                                                 max_seeds=DOSE_LONG_SEEDS)}
    for ref, ref_about in (("rl", "the RL reference"), ("strong", "the strong reference (--strong-reference)")):
        for eps_name, eps in DOSE_EPSILONS.items():
            stem = f"remit{'_strong' if ref == 'strong' else ''}_{eps_name}"
            clip = "no clip" if eps is None else f"clip epsilon {eps}"
            if stem not in VARIANTS:
                out[stem] = Variant("remit", ref, midtrain={"epsilon": eps}, about=f"ReMiT, {ref_about}, {clip}")
            out[f"{stem}_5x"] = Variant("remit", ref, midtrain={"epsilon": eps}, budget_scale=LONG,
                                        about=f"ReMiT, {ref_about}, {clip}, anneal 5× as long", baseline="ntp_5x",
                                        max_seeds=DOSE_LONG_SEEDS)
    out["remit_oracle_noclip"] = Variant("remit", "oracle", midtrain={"epsilon": None},
                                         about="positive control: ReMiT, no clip, guided by the RL reference "
                                               "made certain of every final answer")
    out["remit_oracle_results_noclip"] = Variant("remit", "oracle_results", midtrain={"epsilon": None},
                                                 about="positive control: ReMiT, no clip, guided by the RL reference "
                                                       "made certain of every computed value and final answer")
    return out


VARIANTS.update(_dose_variants())

# Studies: a named set of variants with what each cell does. `dose` skips post-training and scores accuracy
# at the end of each anneal only (the token-level measures are taken at every point): decided before any
# of its numbers, to fit two hours on two cores.
STUDIES: dict[str, dict[str, Any]] = {
    "dose": {
        "variants": ["remit_oracle_noclip", "remit_oracle_results_noclip", "ntp", "remit_eps0.2", "remit_eps0.5", "remit_noclip",
                     "remit_strong_eps0.2", "remit_strong_eps0.5", "remit_strong_noclip",
                     "ntp_5x", "remit_eps0.2_5x", "remit_eps0.5_5x", "remit_noclip_5x",
                     "remit_strong_eps0.2_5x", "remit_strong_eps0.5_5x", "remit_strong_noclip_5x"],
        "size": "full", "posttrain": False, "accuracy_points": "end",
    },
}
HELDOUT_DOCS = 400  # held-out documents for the token-level measures (the tiny world: ~15k tokens)

# Sizes: overrides applied to the config. `config` runs the config as written (your own data and budgets).
# `threads` 1 for the tiny world: a ~1M-parameter model's matmuls are too small to split well, and on a busy
# 2-core machine two torch threads ran mid-training, post-training and evaluation ~10x slower than one.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "midtrain": {"token_budget": 4096, "batch_size": 4, "checkpoint_every": 1000},
        "posttrain": {"stages": [{"kind": "sft", "max_steps": 2, "batch_size": 8}]},
        "evaluation": {"limit": 5, "batch_size": 16},
        "variants": ["ntp", "remit"], "seeds": 2, "heldout_limit": 20, "fractions": [0.5, 1.0], "threads": 1,
    },
    "full": {
        "midtrain": {"token_budget": 200_000, "batch_size": 16},
        "posttrain": {"stages": [
            {"kind": "sft", "max_steps": 60, "lr": 5e-4, "batch_size": 32},
            {"kind": "grpo", "max_steps": 20, "lr": 1e-4, "batch_size": 16,
             "rewards": ["math_answer", "format"],
             "args": {"num_generations": 4, "max_completion_length": 48, "temperature": 1.0, "beta": 0.0}},
        ]},
        "evaluation": {"limit": 100, "batch_size": 64},
        "seeds": 3, "heldout_limit": 100, "threads": 1,
    },
    "config": {},
}


# --- planning ------------------------------------------------------------------------------------


def _world_to_path(cfg: FlywheelConfig, ref: str | None) -> str | None:
    """`world:<x>` as the built path (world folders are named by seed, so resolve before the seed changes)."""
    if ref is None or not ref.startswith("world:"):
        return ref
    from flywheel.world.build import resolve_world_ref

    return str(resolve_world_ref(cfg, ref))


def _resolved_config(cfg: FlywheelConfig) -> dict[str, Any]:
    """The config as JSON with world references as paths: the same base and data for every seed."""
    data = cfg.model_dump(mode="json")
    data["model"]["source"] = _world_to_path(cfg, cfg.model.source)
    data["model"]["tokenizer"] = _world_to_path(cfg, cfg.model.tokenizer)
    data["midtrain"]["reference"] = _world_to_path(cfg, cfg.midtrain.reference)
    for src in data["data"]["sources"]:
        src["source"] = _world_to_path(cfg, src["source"])
    for stage in data["posttrain"]["stages"]:
        stage["data"] = _world_to_path(cfg, stage["data"])
    return data


def _sized(cfg: FlywheelConfig, size: str) -> FlywheelConfig:
    """The config with a size's midtrain, posttrain and evaluation overrides."""
    over = SIZES[size]
    data = cfg.model_dump(mode="json")
    for section in ("midtrain", "evaluation"):
        data[section].update(over.get(section, {}))
    if "posttrain" in over:
        data["posttrain"] = {**data["posttrain"], **copy.deepcopy(over["posttrain"])}
    return validate_config(data, f"ablation size {size}")


def _heldout_source(cfg: FlywheelConfig, heldout: str | None) -> str | None:
    """Held-out text for KL: the given jsonl, else the tiny world's eval problems if the config uses it."""
    if heldout:
        path = Path(heldout).expanduser()
        if not path.is_file():
            raise FlywheelError(f"heldout: {heldout} is not a file; pass a .jsonl with a 'text' field")
        return str(path.resolve())
    if cfg.uses_world():
        from flywheel.world.build import world_paths

        path = world_paths(cfg).corpus("eval")
        return str(path) if path.exists() else None
    return None


def _token_heldout(cfg: FlywheelConfig, heldout: str | None) -> str | None:
    """Held-out text of the mid-training distribution for the token-level measures.

    The given jsonl; else, for the tiny world, HELDOUT_DOCS documents like world:midtrain drawn from
    held-out problems (written once into the home); else none (the measures are skipped).
    """
    if heldout:
        return _heldout_source(cfg, heldout)
    if not cfg.uses_world():
        return None
    from flywheel.data.io import write_jsonl
    from flywheel.world.corpora import heldout_midtrain_docs

    path = cfg.home / "cache" / "heldout" / f"midtrain-s{cfg.seed}-{HELDOUT_DOCS}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, ({"text": t} for t in heldout_midtrain_docs(HELDOUT_DOCS, cfg.seed)))  # atomic
    return str(path)


def prepare_ablation(cfg: FlywheelConfig, variants: list[str] | None = None,
                     seeds: int | list[int] | None = None, size: str = "config",
                     reference: str | None = None, sft_reference: str | None = None,
                     weak_reference: str | None = None, fractions: tuple[float, ...] | None = None,
                     heldout: str | None = None, heldout_limit: int | None = None,
                     threads: int | None = None, dpo_reference: str | None = None,
                     strong_reference: str | None = None, study: str | None = None) -> dict[str, Any]:
    """Check the request and fix all a cell needs as a JSON-able plan; builds the tiny world if used.

    `study` names a set of variants and how their cells run (STUDIES); it sets the size unless one is given,
    and `variants` may then pick some of its variants (a grid run in parts: each cell is reused by content).
    """
    if study is not None:
        if study not in STUDIES:
            raise FlywheelError(f"ablation study: must be one of {', '.join(STUDIES)} (got {study!r})")
        members = STUDIES[study]["variants"]
        outside = [v for v in variants or [] if v not in members]
        if outside:
            raise FlywheelError(f"ablation variants: {', '.join(outside)} not in study {study}; --variants with "
                                f"--study picks among {', '.join(members)}")
        variants = list(variants or members)
        size = STUDIES[study]["size"] if size == "config" else size
    if size not in SIZES:
        raise FlywheelError(f"ablation size: must be one of {', '.join(SIZES)} (got {size!r})")
    over = SIZES[size]
    threads = threads or over.get("threads")
    _use_threads(threads)
    variants = list(variants or over.get("variants") or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FlywheelError(f"ablation variants: unknown {', '.join(unknown)}; "
                            f"choose from {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise FlywheelError("ablation variants: each variant may be named once")
    seeds = seeds if seeds is not None else over.get("seeds", 3)
    seed_list = [cfg.seed + i for i in range(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise FlywheelError("ablation seeds: need at least one seed, each once")
    fractions = tuple(sorted({float(f) for f in (fractions or over.get("fractions") or FRACTIONS)} | {1.0}))
    if fractions[0] <= 0 or fractions[-1] > 1:
        raise FlywheelError("ablation fractions: each must be in (0, 1]")
    if cfg.uses_world():
        from flywheel.world.build import build_world

        build_world(cfg, ladder=False)
    sized = _sized(cfg, size)
    from flywheel.models import resolve_model

    refs = {"rl": reference or sized.midtrain.reference, "sft": sft_reference, "weak": weak_reference,
            "dpo": dpo_reference, "strong": strong_reference}
    refs = {role: resolve_model(sized, _world_to_path(sized, r)) if r else None for role, r in refs.items()}
    if any(VARIANTS[v].reference == "strong" for v in variants) and not refs["strong"]:
        raise FlywheelError("--strong-reference: the variants guided by the strong reference need one; pass a "
                            "post-trained model folder far better at the tasks (docs/results.md shows how the "
                            "tiny world's micro one is made)")
    kind = STUDIES.get(study or "", {})
    return {
        "version": ABLATION_VERSION, "name": cfg.name, "size": size, "variants": variants, "seeds": seed_list,
        "fractions": list(fractions), "config": _resolved_config(sized), "references": refs,
        "bootstrapped": [], "heldout": _heldout_source(cfg, heldout),
        "heldout_limit": heldout_limit or over.get("heldout_limit", 200), "threads": threads,
        "token_heldout": _token_heldout(cfg, heldout), "kind": study,
        "posttrain": kind.get("posttrain", True), "accuracy_points": kind.get("accuracy_points", "all"),
        "study": None, "parent_run": None, "out_dir": None,
    }


def _use_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process (None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def cell_config(plan: dict[str, Any], variant: str, seed: int,
                data_source: str | None = None) -> FlywheelConfig:
    """The plan's config with one variant's mid-training settings and one seed."""
    v = VARIANTS[variant]
    data = copy.deepcopy(plan["config"])
    data["seed"] = seed
    data["midtrain"].update({"objective": v.objective, "reference": None, **v.midtrain})
    data["midtrain"]["token_budget"] *= v.budget_scale
    if data_source is not None:
        data["data"]["sources"] = [{"source": data_source, "weight": 1.0, "text_field": "text"}]
    return validate_config(data, f"ablation variant {variant}")


def _needed_roles(plan: dict[str, Any]) -> set[str]:
    from flywheel.ablation.oracle import ORACLE_ROLES

    roles = {VARIANTS[v].reference for v in plan["variants"]} - {None, *ORACLE_ROLES}
    if any(VARIANTS[v].miniplm or VARIANTS[v].reference in ORACLE_ROLES for v in plan["variants"]):
        roles.add("rl")
    return roles


def cell_seeds(plan: dict[str, Any], variant: str) -> list[int]:
    """The seeds a variant runs: all of the plan's, or its first `max_seeds`."""
    cap = VARIANTS[variant].max_seeds
    return plan["seeds"][:cap] if cap else plan["seeds"]


def _bootstrap(plan: dict[str, Any], roles: set[str]) -> dict[str, str]:
    """Missing references made the way round 0 makes one: NTP anneal → the config's post-training chain.

    rl: the chain's last output; sft: the output of the last SFT stage before the final stage;
    weak: the final stage re-run from its own input with a quarter of its steps (an early RL checkpoint);
    dpo: the anneal post-trained by DPO alone (the chain's DPO stage, else a DPO stage of the chain's
    longest stage's steps on the default preference data), an RL reference from another source.
    The anneal is the `ntp` cell of the first seed (its own run, reused by that cell), as in round 0.
    """
    from flywheel.posttrain import posttrain

    cfg = cell_config(plan, "ntp", plan["seeds"][0])
    mid, _ = midtrain_with_points(plan, cfg, plan["config"]["model"]["source"], None)
    chain = posttrain(cfg, mid.checkpoint)
    stages = cfg.posttrain.stages
    out: dict[str, str] = {"rl": str(chain.checkpoint)}
    if "sft" in roles:
        sft = [r for r in chain.stages[:-1] if r.kind == "sft"]
        if not sft:
            raise FlywheelError("remit_sft_ref: the post-training chain has no SFT stage before its last "
                                "stage, so there is no SFT reference to bootstrap; pass sft_reference")
        out["sft"] = str(sft[-1].checkpoint)
    if "weak" in roles:
        last = stages[-1].model_copy(update={"max_steps": max(1, stages[-1].max_steps // 4)})
        early = cfg.model_copy(update={"posttrain": cfg.posttrain.model_copy(update={"stages": [last]})})
        start = chain.stages[-2].checkpoint if len(chain.stages) > 1 else mid.checkpoint
        out["weak"] = str(posttrain(early, start).checkpoint)
    if "dpo" in roles:
        out["dpo"] = str(posttrain(_dpo_only(plan, cfg), mid.checkpoint).checkpoint)
    return out


def _dpo_only(plan: dict[str, Any], cfg: FlywheelConfig) -> FlywheelConfig:
    """The cell config with a post-training chain of one DPO stage (for remit_dpo_ref's reference)."""
    stages = plan["config"]["posttrain"]["stages"]
    dpo = [s for s in stages if s["kind"] == "dpo"]
    if dpo:
        stage = dpo[0]
    else:
        try:  # the tiny world's preference pairs, resolved with the plan's own seed
            pairs = _world_to_path(validate_config(plan["config"]), "world:dpo")
        except FlywheelError:  # no world built: the study runs on the user's own data
            raise FlywheelError("remit_dpo_ref: the post-training chain has no DPO stage to take preference data "
                                "from; add a dpo stage to posttrain.stages or pass dpo_reference") from None
        stage = {"kind": "dpo", "data": pairs, "max_steps": max(s["max_steps"] for s in stages),
                 "batch_size": min(s["batch_size"] for s in stages)}
    data = cfg.model_dump(mode="json")
    data["posttrain"]["stages"] = [stage]
    return validate_config(data, "ablation's DPO-only reference chain")


def resolve_references(plan: dict[str, Any]) -> dict[str, Any]:
    """Bootstrap the references the variants need and nobody gave; fix the study key and MLflow parent run."""
    from flywheel.models import model_identity

    plan = copy.deepcopy(plan)
    _use_threads(plan["threads"])
    missing = {r for r in _needed_roles(plan) if not plan["references"].get(r)}
    if missing:
        made = _bootstrap(plan, missing)
        for role in missing:
            plan["references"][role] = made[role]
        plan["bootstrapped"] = sorted(missing)
    from flywheel.ablation.oracle import ORACLE_ROLES, oracle_folder

    for role in sorted({VARIANTS[v].reference for v in plan["variants"]} & set(ORACLE_ROLES)):
        plan["references"][role] = str(oracle_folder(validate_config(plan["config"]), plan["references"]["rl"],
                                                     ORACLE_ROLES[role]))
    config = {k: v for k, v in plan["config"].items() if k != "home"}
    # the later roles only when used, so the studies made before them keep their keys
    idents = {r: model_identity(p) if p else None for r, p in plan["references"].items()
              if p or r not in ("strong", *ORACLE_ROLES)}
    plan["notes"] = _reference_notes(plan, idents)
    later = [plan["kind"], plan["token_heldout"]] if plan["kind"] else []
    plan["study"] = fingerprint(ABLATION_VERSION, config, plan["variants"], plan["seeds"], plan["fractions"],
                                idents, model_identity(plan["config"]["model"]["source"]), plan["heldout"],
                                plan["heldout_limit"], *later)
    home = Path(plan["config"]["home"])
    plan["out_dir"] = str(home / "reports" / f"ablation-{plan['study']}")
    plan["parent_run"] = _parent_run(plan)
    return plan


def _reference_notes(plan: dict[str, Any], idents: dict[str, str | None]) -> list[str]:
    """Say when two references are the same weights (a GRPO stage whose groups all tie changes nothing)."""
    notes = []
    if plan["bootstrapped"]:
        notes.append(f"bootstrapped references ({', '.join(plan['bootstrapped'])}): the ntp cell of seed "
                     f"{plan['seeds'][0]} post-trained with the same chain, as a flywheel's round 0 does")
    if not plan.get("posttrain", True):
        notes.append(f"study {plan['kind']}: no post-training; accuracy is scored at the end of each anneal only, "
                     "the held-out token loss at every point")
    roles = [r for r in ("rl", "sft", "weak", "dpo", "strong") if idents.get(r)]
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            if idents[a] == idents[b]:
                notes.append(f"the {a} and {b} references are the same weights: their variants cannot differ")
    return notes


# --- MLflow --------------------------------------------------------------------------------------


def _tracker(plan: dict[str, Any]):  # noqa: ANN202 - Tracker, imported lazily
    from flywheel.tracking.store import open_tracker

    return open_tracker(validate_config(plan["config"]))


def _parent_run(plan: dict[str, Any]) -> str:
    """One parent run per study (found again on a rerun), its cells as children."""
    from flywheel.tracking.store import STAGE_TAG

    tracker = _tracker(plan)
    found = tracker.client.search_runs([tracker.experiment_id],
                                       filter_string=f"tags.`{ABLATION_TAG}` = '{plan['study']}' and "
                                                     f"tags.`{STAGE_TAG}` = 'ablation'", max_results=1)
    if found:
        return found[0].info.run_id
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"ablation-{plan['study'][:8]}",
                                    tags={ABLATION_TAG: plan["study"], STAGE_TAG: "ablation"})
    mt = plan["config"]["midtrain"]
    tracker.log_params(run.info.run_id, {
        "variants": ",".join(plan["variants"]), "seeds": ",".join(map(str, plan["seeds"])),
        "size": plan["size"],
        "fractions": ",".join(f"{f:.3f}" for f in plan["fractions"]), "token_budget": mt["token_budget"],
        "base": plan["config"]["model"]["source"], "references": plan["references"],
        "bootstrapped": ",".join(plan["bootstrapped"]) or "none",
        "posttrain": " -> ".join(s["kind"] for s in plan["config"]["posttrain"]["stages"]),
    })
    return run.info.run_id


def _finished_child(tracker, plan: dict[str, Any], variant: str, seed: int) -> str | None:  # noqa: ANN001
    from flywheel.tracking.store import PARENT_TAG

    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{plan['parent_run']}' and tags.`{VARIANT_TAG}` = '{variant}' "
                      f"and tags.`{SEED_TAG}` = '{seed}' and attributes.status = 'FINISHED'", max_results=1)
    return runs[0].info.run_id if runs else None


def _log_cell(plan: dict[str, Any], cell: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """A child run per cell: scores at each point with step = tokens, post-training scores, KL, the loss."""
    from flywheel.tracking.store import PARENT_TAG, STAGE_TAG

    tracker = _tracker(plan)
    variant, seed = cell["variant"], cell["seed"]
    done = _finished_child(tracker, plan, variant, seed)
    if done:
        return done
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"{variant}/seed-{seed}", tags={
        PARENT_TAG: plan["parent_run"], ABLATION_TAG: plan["study"], STAGE_TAG: "ablation-cell",
        VARIANT_TAG: variant, SEED_TAG: str(seed)})
    run_id = run.info.run_id
    try:
        tracker.log_params(run_id, {"variant": variant, "seed": seed, "midtrain": cell["midtrain_config"],
                                    "reference": cell["reference"], "data": cell["data"]})
        for point in cell["curve"]:
            scores = {f"mid/{k}": v for k, v in point["metrics"].items()}
            nll = point.get("token_nll") or {}
            scores.update({f"heldout_nll/{k}": v for k, v in (nll.get("classes") or {}).items() if v is not None})
            if nll.get("all") is not None:
                scores["heldout_nll/all"] = nll["all"]
            tracker.log_metrics(run_id, scores, step=point["tokens"])
        if cell["post"]:
            tracker.log_metrics(run_id, {f"post/{k}": v for k, v in cell["post"].items()})
        if cell["kl"] is not None:
            tracker.log_metrics(run_id, {"mid/kl_to_reference": cell["kl"]})
        tracker.log_metrics(run_id, {f"seconds/{k}": v for k, v in cell["seconds"].items()})
        tracker.log_history(run_id, history, prefix="train/")
    except BaseException:
        tracker.client.set_terminated(run_id, "FAILED")
        raise
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


# --- one cell ------------------------------------------------------------------------------------


def _evaluate(cfg: FlywheelConfig, checkpoint: str | Path, kind: str) -> dict[str, float]:
    """`evaluate`, reused when the same weights were already scored with the same settings."""
    from flywheel.evaluation import eval_dir, evaluate
    from flywheel.models import model_identity

    folder = eval_dir(cfg, model_identity(str(checkpoint)), kind)  # by content: a redone run is rescored
    if (folder / "results.json").exists():
        return json.loads((folder / "results.json").read_text())["metrics"]
    return evaluate(cfg, checkpoint, kind=kind, out_dir=folder).metrics  # type: ignore[arg-type]


def snapshot_steps(total_steps: int, fractions: list[float]) -> dict[int, float]:
    """Optimizer step of each fraction of the budget (the last is the run's end), step -> fraction."""
    steps: dict[int, float] = {}
    for f in fractions:
        steps.setdefault(min(total_steps, max(1, round(f * total_steps))), f)
    steps.pop(total_steps, None)
    return dict(sorted(steps.items()))


def _snapshot_callback(folder: Path, steps: set[int], tok: Any) -> Any:
    """A TrainerCallback that saves the model at the given steps: the curve's intermediate points."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN202
            target = folder / f"step-{state.global_step}"
            if state.global_step in steps and state.is_world_process_zero and not target.exists():
                with atomic_dir(target) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
                    tok.save_pretrained(tmp)

    return Snapshots()


def _run_dir_and_steps(cfg: FlywheelConfig, base: str, reference: str | None) -> tuple[Path, int, int, Any]:
    """Where this cell's anneal lives (keyed like `midtrain`'s own folder), its steps and tokens per step."""
    from flywheel.data.mixture import build_mixture
    from flywheel.models import load_tokenizer, resolve_model, tokenizer_identity
    from flywheel.remit.midtrain import NEEDS_REFERENCE, _world_size, midtrain_key

    mt = cfg.midtrain
    tok = load_tokenizer(cfg, cfg.model.tokenizer or base)
    corpus = build_mixture(cfg, tok, tokenizer_identity(tok))
    ref_path = resolve_model(cfg, reference) if reference and mt.objective in NEEDS_REFERENCE else None
    key = midtrain_key(cfg, resolve_model(cfg, base), ref_path, corpus.key)
    per_step = mt.batch_size * mt.grad_accum * _world_size() * mt.seq_len
    steps = max(1, math.ceil(mt.token_budget / per_step))
    return cfg.home / "runs" / cfg.name / "ablation" / f"midtrain-{key}", steps, per_step, tok


def _heldout_texts(plan: dict[str, Any]) -> list[str]:
    """Up to `heldout_limit` held-out texts spread evenly (the world's eval file is sorted by level)."""
    if not plan["heldout"]:
        return []
    rows = read_jsonl(Path(plan["heldout"]))
    texts = [r["text"] if "text" in r else f"{r['question']}\n{r['solution']}" for r in rows]
    n = min(len(texts), plan["heldout_limit"])
    return [texts[i * len(texts) // n] for i in range(n)] if n else []


def heldout_kl(cfg: FlywheelConfig, model_path: str | Path, reference: str | Path, texts: list[str],
               batch: int = 32) -> float:
    """Mean per-token KL(model ‖ reference) of the next-token distributions over held-out texts.

    How far mid-training moved the model toward (or away from) the reference, on text neither trained on.
    """
    import torch

    from flywheel.models import load_model, load_tokenizer
    from flywheel.remit.dynamics import mean_kl

    tok = load_tokenizer(cfg, str(model_path))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batches():  # noqa: ANN202
        for b in range(0, len(texts), batch):
            encoded = tok(texts[b : b + batch], add_special_tokens=False)["input_ids"]
            ids = [x + [tok.eos_token_id] for x in encoded]
            width = max(len(x) for x in ids)
            yield (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                   torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))

    return mean_kl(load_model(cfg, str(model_path), for_training=False),
                   load_model(cfg, str(reference), for_training=False), batches())


_TOKEN_CONTEXT: dict[str, tuple[Any, dict[str, Any], Path]] = {}


def _token_context(plan: dict[str, Any], cfg: FlywheelConfig) -> tuple[Any, dict[str, Any], Path]:
    """The held-out split with its token classes, and the δ-buckets of every reference; once per study."""
    key = f"{plan['study']}:{plan['token_heldout']}"
    if key in _TOKEN_CONTEXT:
        return _TOKEN_CONTEXT[key]
    from flywheel.ablation import tokens
    from flywheel.ablation.oracle import ORACLE_ROLES, oracle_logprobs
    from flywheel.models import load_tokenizer

    tok = load_tokenizer(cfg)
    held = tokens.heldout_tokens([r["text"] for r in read_jsonl(Path(plan["token_heldout"]))], tok)
    cache = cfg.home / "cache" / "heldout-scores"
    base_lp = tokens.model_scores(cfg, plan["config"]["model"]["source"], held, cache)
    refs = plan["references"]
    buckets = {}
    for role, path in refs.items():
        if not path:
            continue
        if role in ORACLE_ROLES:  # the RL reference's scores, certain where the oracle is
            table = tokens.pieces(tok)
            ref_lp = [oracle_logprobs(lp, tokens.answer_mask(ids, table, ORACLE_ROLES[role])[1:])
                      for lp, ids in zip(tokens.model_scores(cfg, refs["rl"], held, cache), held.ids, strict=True)]
        else:
            ref_lp = tokens.model_scores(cfg, path, held, cache)
        buckets[role] = tokens.delta_buckets(tokens.centred_delta(ref_lp, base_lp))
    _TOKEN_CONTEXT[key] = (held, buckets, cache)
    return _TOKEN_CONTEXT[key]


def token_measures(plan: dict[str, Any], cfg: FlywheelConfig, checkpoint: str | Path) -> dict[str, Any] | None:
    """Held-out NLL of one checkpoint by token class and by each reference's δ-bucket (None: no held-out text)."""
    if not plan.get("token_heldout"):
        return None
    from flywheel.ablation import tokens

    held, buckets, cache = _token_context(plan, cfg)
    return tokens.measures(tokens.model_scores(cfg, checkpoint, held, cache), held, buckets)


def midtrain_with_points(plan: dict[str, Any], cfg: FlywheelConfig, base: str, reference: str | None,
                         callbacks: list | None = None) -> tuple[Any, list[tuple[int, int, Path]]]:
    """One anneal that also saves the model at the plan's fractions; (step, tokens, checkpoint) per point."""
    from flywheel.remit.midtrain import midtrain

    run_dir, total_steps, per_step, tok = _run_dir_and_steps(cfg, base, reference)
    steps = snapshot_steps(total_steps, plan["fractions"])
    points_dir = run_dir / "points"
    cbs = [_snapshot_callback(points_dir, set(steps), tok), *(callbacks or [])]
    mid = midtrain(cfg, base, reference, run_dir=run_dir, callbacks=cbs)
    if any(not (points_dir / f"step-{s}").exists() for s in steps):  # finished before, without points: redo
        shutil.rmtree(run_dir)
        mid = midtrain(cfg, base, reference, run_dir=run_dir, callbacks=cbs)
    points = [(s, s * per_step, points_dir / f"step-{s}") for s in steps]
    return mid, points + [(total_steps, total_steps * per_step, mid.checkpoint)]


def run_cell(plan: dict[str, Any], variant: str, seed: int, callbacks: list | None = None) -> dict[str, Any]:
    """Mid-train one variant × seed, score it along the way, post-train it, score it again; log a child."""
    from flywheel.posttrain import posttrain

    if plan.get("parent_run") is None:
        raise FlywheelError("run_cell: the plan has no study yet; call resolve_references(plan) first")
    _use_threads(plan["threads"])
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    v = VARIANTS[variant]
    base = plan["config"]["model"]["source"]
    reference = plan["references"][v.reference] if v.reference else None
    cfg = cell_config(plan, variant, seed)
    data = [s.source for s in cfg.data.sources]
    if v.miniplm:
        from flywheel.ablation.miniplm import select_documents

        selection = select_documents(cfg, base, plan["references"]["rl"], MINIPLM_KEEP)
        cfg = cell_config(plan, variant, seed, data_source=str(selection.path))
        data = [f"{selection.path} (kept {selection.kept} of {selection.documents} documents)"]
        seconds["select"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    from flywheel.ablation.oracle import ORACLE_ROLES, write_oracle_cache

    if v.reference in ORACLE_ROLES:  # the oracle is a cache: written before the anneal reads it
        write_oracle_cache(cfg, plan["references"]["rl"], reference, ORACLE_ROLES[v.reference])
    mid, points = midtrain_with_points(plan, cfg, base, reference, callbacks)
    seconds["midtrain"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    every_point = plan.get("accuracy_points", "all") == "all"
    curve = [{"step": step, "tokens": tokens, "checkpoint": str(path),
              "metrics": _evaluate(cfg, path, "base") if every_point or i == len(points) - 1 else {}}
             for i, (step, tokens, path) in enumerate(points)]
    seconds["evaluate_mid"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    for point in curve:
        point["token_nll"] = token_measures(plan, cfg, point["checkpoint"])
    seconds["token_measures"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    texts = _heldout_texts(plan)
    rl = plan["references"]["rl"]
    kl = heldout_kl(cfg, mid.checkpoint, rl, texts) if texts and rl else None
    seconds["kl"] = time.perf_counter() - t1

    post, post_metrics = None, {}
    if plan.get("posttrain", True):
        t1 = time.perf_counter()
        post = posttrain(cfg, mid.checkpoint)
        seconds["posttrain"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        post_metrics = _evaluate(cfg, post.checkpoint, "post")
        seconds["evaluate_post"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0

    cell = {
        "variant": variant, "seed": seed, "reference": reference, "data": data,
        "midtrain_config": cfg.midtrain.model_dump(mode="json", exclude={"reference"}),
        "curve": curve, "mid": curve[-1]["metrics"], "post": post_metrics, "kl": kl,
        "midtrain_checkpoint": str(mid.checkpoint), "post_checkpoint": str(post.checkpoint) if post else None,
        "reused": bool(mid.reused and (post is None or post.reused)), "seconds": seconds,
    }
    cell["run_id"] = _log_cell(plan, cell, mid.metrics.get("log_history", []))
    return cell


def evaluate_base(plan: dict[str, Any]) -> dict[str, Any]:
    """The pre-anneal base's scores: every variant's curve starts here at 0 tokens."""
    _use_threads(plan["threads"])
    t0 = time.perf_counter()
    cfg = cell_config(plan, "ntp", plan["seeds"][0])
    metrics = _evaluate(cfg, plan["config"]["model"]["source"], "base")
    return {"tokens": 0, "metrics": metrics, "token_nll": token_measures(plan, cfg, plan["config"]["model"]["source"]),
            "seconds": time.perf_counter() - t0}


# --- the whole study -----------------------------------------------------------------------------


def failed_cell(variant: str, seed: int, error: BaseException | str) -> dict[str, Any]:
    """What a crashed cell leaves in the table: its name and why."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"variant": variant, "seed": seed, "failed": True, "error": text}


def finish_ablation(plan: dict[str, Any], base: dict[str, Any], cells: list[dict[str, Any]],
                    echo: bool = True) -> dict[str, Any]:
    """Summarize, write JSON/markdown/PNG, log them to the parent run, print the tables."""
    from flywheel.ablation.report import log_report, summarize, write_report

    cfg = cell_config(plan, "ntp", plan["seeds"][0])
    # how good the guides are, scored like every post-trained model (zero-shot, chat template); reused by content
    refs = {role: _evaluate(cfg, path, "post") for role, path in plan["references"].items()
            if path and not role.startswith("oracle")}  # an oracle's weights are the RL reference's
    report = summarize(plan, {**base, "references": refs}, cells)
    write_report(report, Path(plan["out_dir"]))
    log_report(_tracker(plan), plan["parent_run"], report, Path(plan["out_dir"]))
    if echo:
        print(report["markdown"])
        print(f"report: {report['files']['json']}\nplot: {report['files']['plot']}")
    return report


def run_ablation(cfg: FlywheelConfig, variants: list[str] | None = None, seeds: int | list[int] | None = None,
                 size: str = "config", reference: str | None = None, sft_reference: str | None = None,
                 weak_reference: str | None = None, fractions: tuple[float, ...] | None = None,
                 heldout: str | None = None, heldout_limit: int | None = None, threads: int | None = None,
                 echo: bool = True, dpo_reference: str | None = None, strong_reference: str | None = None,
                 study: str | None = None) -> dict[str, Any]:
    """The whole study without Prefect: every (variant, seed) cell in turn; a crash costs that cell only."""
    t0 = time.perf_counter()
    plan = prepare_ablation(cfg, variants, seeds, size, reference, sft_reference, weak_reference, fractions,
                            heldout, heldout_limit, threads, dpo_reference=dpo_reference,
                            strong_reference=strong_reference, study=study)
    plan = resolve_references(plan)
    base = evaluate_base(plan)
    cells = []
    for variant in plan["variants"]:
        for seed in cell_seeds(plan, variant):
            try:
                cells.append(run_cell(plan, variant, seed))
            except FlywheelError:
                raise  # a user error fails every cell the same way: say it once
            except Exception as exc:
                traceback.print_exc()
                cells.append(failed_cell(variant, seed, exc))
    report = finish_ablation(plan, base, cells, echo=echo)
    report["seconds"] = time.perf_counter() - t0
    return report

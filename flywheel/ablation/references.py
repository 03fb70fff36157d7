"""The study's references made complete: missing ones bootstrapped, oracles derived, the study key fixed."""

from __future__ import annotations

import copy
from pathlib import Path

from flywheel.ablation.catalogue import VARIANTS
from flywheel.ablation.cell import midtrain_with_points
from flywheel.ablation.oracle import ORACLE_ROLES, oracle_folder
from flywheel.ablation.plan import ABLATION_VERSION, AblationPlan, cell_config, use_threads, world_dpo_pairs
from flywheel.ablation.tracking import parent_run
from flywheel.config import FlywheelConfig, validate_config
from flywheel.data.io import fingerprint
from flywheel.errors import FlywheelError


def _needed_roles(plan: AblationPlan) -> set[str]:
    """The reference roles the plan's variants read (an oracle's and MiniPLM's need the RL one)."""
    roles = {VARIANTS[v].reference for v in plan.variants} - {None, *ORACLE_ROLES}
    if any(VARIANTS[v].miniplm or VARIANTS[v].reference in ORACLE_ROLES for v in plan.variants):
        roles.add("rl")
    return roles


def _bootstrap(plan: AblationPlan, roles: set[str]) -> dict[str, str]:
    """Missing references made the way round 0 makes one: NTP anneal → the config's post-training chain.

    rl: the chain's last output; sft: the output of the last SFT stage before the final stage;
    weak: the final stage re-run from its own input with a quarter of its steps (an early RL checkpoint);
    dpo: the anneal post-trained by DPO alone (the chain's DPO stage, else a DPO stage of the chain's
    longest stage's steps on the default preference data), an RL reference from another source.
    The anneal is the `ntp` cell of the first seed (its own run, reused by that cell), as in round 0.
    """
    from flywheel.posttrain import posttrain

    cfg = cell_config(plan, "ntp", plan.seeds[0])
    mid, _ = midtrain_with_points(plan, cfg, plan.base, None)
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


def _dpo_only(plan: AblationPlan, cfg: FlywheelConfig) -> FlywheelConfig:
    """The cell config with a post-training chain of one DPO stage (for remit_dpo_ref's reference)."""
    stages = plan.config["posttrain"]["stages"]
    dpo = [s for s in stages if s["kind"] == "dpo"]
    if dpo:
        stage = dpo[0]
    else:
        try:
            pairs = world_dpo_pairs(plan)
        except FlywheelError:  # no world built: the study runs on the user's own data
            raise FlywheelError("remit_dpo_ref: the post-training chain has no DPO stage to take preference data "
                                "from; add a dpo stage to posttrain.stages or pass dpo_reference") from None
        stage = {"kind": "dpo", "data": pairs, "max_steps": max(s["max_steps"] for s in stages),
                 "batch_size": min(s["batch_size"] for s in stages)}
    data = cfg.model_dump(mode="json")
    data["posttrain"]["stages"] = [stage]
    return validate_config(data, "ablation's DPO-only reference chain")


def _reference_notes(plan: AblationPlan, idents: dict[str, str | None]) -> list[str]:
    """Say when two references are the same weights (a GRPO stage whose groups all tie changes nothing)."""
    notes = []
    if plan.bootstrapped:
        notes.append(f"bootstrapped references ({', '.join(plan.bootstrapped)}): the ntp cell of seed "
                     f"{plan.seeds[0]} post-trained with the same chain, as a flywheel's round 0 does")
    if not plan.posttrain:
        notes.append(f"study {plan.kind}: no post-training; accuracy is scored at the end of each anneal only, "
                     "the held-out token loss at every point")
    roles = [r for r in ("rl", "sft", "weak", "dpo", "strong") if idents.get(r)]
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            if idents[a] == idents[b]:
                notes.append(f"the {a} and {b} references are the same weights: their variants cannot differ")
    return notes


def _study_key(plan: AblationPlan, idents: dict[str, str | None]) -> str:
    """The study's content key: config, variants, seeds, fractions, references, base and held-out text."""
    from flywheel.models import model_identity

    config = {k: v for k, v in plan.config.items() if k != "home"}
    later = [plan.kind, plan.token_heldout] if plan.kind else []
    return fingerprint(ABLATION_VERSION, config, plan.variants, plan.seeds, plan.fractions, idents,
                       model_identity(plan.base), plan.heldout, plan.heldout_limit, *later)


def resolve_references(plan: AblationPlan) -> AblationPlan:
    """Bootstrap the references the variants need and nobody gave; fix the study key and MLflow parent run."""
    from flywheel.models import model_identity

    plan = copy.deepcopy(plan)
    use_threads(plan.threads)
    missing = {r for r in _needed_roles(plan) if not plan.references.get(r)}
    if missing:
        made = _bootstrap(plan, missing)
        for role in missing:
            plan.references[role] = made[role]
        plan.bootstrapped = sorted(missing)
    for role in sorted({VARIANTS[v].reference for v in plan.variants} & set(ORACLE_ROLES)):
        plan.references[role] = str(oracle_folder(plan.flywheel_config(), plan.references["rl"], ORACLE_ROLES[role]))
    # the later roles only when used, so the studies made before them keep their keys
    idents = {r: model_identity(p) if p else None for r, p in plan.references.items()
              if p or r not in ("strong", *ORACLE_ROLES)}
    plan.notes = _reference_notes(plan, idents)
    plan.study = _study_key(plan, idents)
    plan.out_dir = str(Path(plan.config["home"]) / "reports" / f"ablation-{plan.study}")
    plan.parent_run = parent_run(plan)
    return plan

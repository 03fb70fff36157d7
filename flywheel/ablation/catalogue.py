"""What an ablation can run, as data: the variants, the named studies and the sizes.

Nothing here depends on the config: a variant names an objective, a reference role and changes to the
config's mid-training section, and `plan.cell_config` applies them to the config the study runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FRACTIONS = (1 / 3, 2 / 3, 1.0)
MINIPLM_KEEP = 0.8
HELDOUT_DOCS = 400  # held-out documents for the token-level measures (the tiny world: ~15k tokens)


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
    contrast: str | None = None  # another variant it is paired with as well (frozen δ: the same cell with live δ)


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
    """The dose grid's variants not already in VARIANTS: each ε × reference, short and long, and the controls."""
    out: dict[str, Variant] = {"ntp_5x": Variant("ntp", None, budget_scale=LONG, baseline="ntp_5x",
                                                 about="NTP, anneal 5× as long (full size: 1M tokens)",
                                                 max_seeds=DOSE_LONG_SEEDS)}
    for ref, ref_about in (("rl", "the RL reference"), ("strong", "the strong reference (--strong-reference)")):
        for eps_name, eps in DOSE_EPSILONS.items():
            stem = f"remit{'_strong' if ref == 'strong' else ''}_{eps_name}"
            clip = "no clip" if eps is None else f"clip epsilon {eps}"
            strong = ref == "strong"  # a strong-reference cell is read against the RL one of the same ε as well
            if stem not in VARIANTS:
                out[stem] = Variant("remit", ref, midtrain={"epsilon": eps}, about=f"ReMiT, {ref_about}, {clip}",
                                    contrast=f"remit_{eps_name}" if strong else None)
            out[f"{stem}_5x"] = Variant("remit", ref, midtrain={"epsilon": eps}, budget_scale=LONG,
                                        about=f"ReMiT, {ref_about}, {clip}, anneal 5× as long", baseline="ntp_5x",
                                        max_seeds=DOSE_LONG_SEEDS, contrast=f"remit_{eps_name}_5x" if strong else None)
    out["remit_oracle_noclip"] = Variant("remit", "oracle", midtrain={"epsilon": None},
                                         about="positive control: ReMiT, no clip, guided by the RL reference "
                                               "made certain of every final answer")
    out["remit_oracle_results_noclip"] = Variant("remit", "oracle_results", midtrain={"epsilon": None},
                                                 about="positive control: ReMiT, no clip, guided by the RL reference "
                                                       "made certain of every computed value and final answer")
    return out


VARIANTS.update(_dose_variants())

# δ against the frozen pre-anneal base (midtrain.delta_base: frozen; flywheel/remit/frozen.py), each contrasted
# with the same cell under the paper's live δ (issue 34).
FROZEN_EPSILONS = {"eps0.2": 0.2, "noclip": None}


def _frozen_variants() -> dict[str, Variant]:
    """Frozen-δ ReMiT for each reference and ε of FROZEN_EPSILONS, contrasted with the live-δ variant."""
    out = {}
    for ref, stem in (("rl", "remit"), ("strong", "remit_strong")):
        for eps_name, eps in FROZEN_EPSILONS.items():
            clip = "no clip" if eps is None else f"clip epsilon {eps}"
            out[f"{stem}_frozen_{eps_name}"] = Variant(
                "remit", ref, midtrain={"epsilon": eps, "delta_base": "frozen"}, contrast=f"{stem}_{eps_name}",
                about=f"ReMiT, the {'RL' if ref == 'rl' else 'strong'} reference, {clip}, δ against the frozen base")
    return out


VARIANTS.update(_frozen_variants())


@dataclass(frozen=True)
class Study:
    """A named set of variants with what each of its cells does."""

    variants: list[str]
    size: str
    posttrain: bool = True  # False: no post-training, the cells end with the anneal
    accuracy_points: str = "all"  # all: accuracy at every point of the curve; end: at the end of the anneal only


# `dose` skips post-training and scores accuracy at the end of each anneal only (the token-level measures are
# taken at every point): decided before any of its numbers, to fit two hours on two cores.
STUDIES: dict[str, Study] = {
    "dose": Study(
        variants=["remit_oracle_noclip", "remit_oracle_results_noclip", "ntp", "remit_eps0.2", "remit_eps0.5",
                  "remit_noclip", "remit_strong_eps0.2", "remit_strong_eps0.5", "remit_strong_noclip",
                  "ntp_5x", "remit_eps0.2_5x", "remit_eps0.5_5x", "remit_noclip_5x",
                  "remit_strong_eps0.2_5x", "remit_strong_eps0.5_5x", "remit_strong_noclip_5x"],
        size="full", posttrain=False, accuracy_points="end",
    ),
    # issue 34: the reference axis again with a reference stronger by construction, and live vs frozen δ; the
    # dose study's settings at its short length (200k tokens), declared in docs/results.md before the grid ran
    "strong": Study(
        variants=["ntp", "remit_eps0.2", "remit_eps0.5", "remit_noclip", "remit_strong_eps0.2",
                  "remit_strong_eps0.5", "remit_strong_noclip", "remit_frozen_eps0.2", "remit_frozen_noclip",
                  "remit_strong_frozen_eps0.2", "remit_strong_frozen_noclip"],
        size="full", posttrain=False, accuracy_points="end",
    ),
}

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


def contrast_of(variant: str) -> str | None:
    """The variant a variant is contrasted with besides its baseline (None: none, or unknown)."""
    return VARIANTS[variant].contrast if variant in VARIANTS else None


def baseline_of(variant: str, default: str = "ntp") -> str:
    """The NTP variant a variant is compared with (the one of the same anneal length); `default` if unknown."""
    return VARIANTS[variant].baseline if variant in VARIANTS else default

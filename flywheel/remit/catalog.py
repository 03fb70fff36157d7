"""The mid-training objectives as one table: each entry's name and what it needs to train.

Torch-free on purpose: the config reads it to validate `midtrain.objective`. The formulas live in
objectives.py (`LOSSES`, keyed by the same names) and the loss kernels in kernels.py; every other
module asks an entry here (`objective_named(mt.objective).reads_cache(mt.reference_mode)`), never
compares objective names. A new objective is one entry below and its formulas in `LOSSES`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """One mid-training objective and what it needs."""

    name: str
    about: str
    uses_ref_logprobs: bool = False  # reads the reference's log p(target): a precomputed cache can serve it
    uses_ref_distribution: bool = False  # reads the reference's whole next-token distribution: online only
    second_pass: bool = False  # picks its tokens over the whole micro-batch: a chunked loss reads every log-prob first
    whole_rows: bool = False  # centres over each row (or its documents), so a chunk of its loss is whole rows
    token_weights: bool = False  # produces per-token weights and deltas (the weight diagnostics and page)
    weight_rule: str | None = None  # those weights' rule in words; None: midtrain.epsilon / centring / mapping's
    unit_weights: bool = False  # trains every token at weight 1: its weight std and clip fractions are 0

    @property
    def needs_reference(self) -> bool:
        """Whether a reference model guides it at all."""
        return self.uses_ref_logprobs or self.uses_ref_distribution

    @property
    def follows_weight_settings(self) -> bool:
        """Whether midtrain.epsilon, centring and mapping shape its token weights."""
        return self.token_weights and self.weight_rule is None

    def reads_cache(self, reference_mode: str) -> bool:
        """Whether it trains from the scored reference cache under `midtrain.reference_mode`."""
        return self.uses_ref_logprobs and reference_mode == "cached"

    def loads_reference(self, reference_mode: str) -> bool:
        """Whether the reference model runs beside the model while it trains."""
        return self.needs_reference and not self.reads_cache(reference_mode)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("ntp", "plain next-token prediction, the baseline", unit_weights=True),
    Objective("remit", "NLL re-weighted by how much more the reference expects each token (the method)",
              uses_ref_logprobs=True, whole_rows=True, token_weights=True),
    Objective("kd", "knowledge distillation from the reference's next-token distribution",
              uses_ref_distribution=True),
    Objective("rho1", "Rho-1: train only on the tokens with the largest excess loss over the reference",
              uses_ref_logprobs=True, second_pass=True, token_weights=True, weight_rule="rho1 selection"),
)}
NAMES: tuple[str, ...] = tuple(OBJECTIVES)
BASELINE: Objective = OBJECTIVES["ntp"]  # what every other objective is compared with (and round 0 anneals)


def objective_named(name: str | Objective) -> Objective:
    """The table's entry for `name` (an entry is returned as it is); ValueError for an unknown name."""
    if isinstance(name, Objective):
        return name
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {NAMES}, got {name!r}")
    return OBJECTIVES[name]

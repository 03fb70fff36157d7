"""The study plan: the request checked and fixed as a typed `AblationPlan` before any cell runs.

`prepare_ablation` sizes the config, picks variants, seeds and fractions, and resolves every path a cell
needs; `references.resolve_references` then fills in the references and the study key. The plan is JSON only
where it leaves the process: the Prefect task parameters and the report written to disk (`to_json`,
`from_json`). This module is the one place the ablation resolves `world:` references.

Seeds change `cfg.seed` only: the mixture's document order, the data order and post-training's sampling.
The base is the same folder for every cell (world references are resolved to paths before the seed
changes, since the tiny world's folders are named by seed).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flywheel.ablation.catalogue import FRACTIONS, HELDOUT_DOCS, SIZES, STUDIES, VARIANTS, Study
from flywheel.config import FlywheelConfig, validate_config
from flywheel.errors import FlywheelError

ABLATION_VERSION = 1


@dataclass
class AblationPlan:
    """Everything every cell of one study shares; the fields (in order) are the plan's JSON keys."""

    version: int
    name: str
    size: str
    variants: list[str]
    seeds: list[int]
    fractions: list[float]
    config: dict[str, Any]  # the sized config as JSON, world references as paths
    references: dict[str, str | None]  # role -> model folder (None: not given, not needed)
    bootstrapped: list[str]
    heldout: str | None  # held-out text for KL
    heldout_limit: int
    threads: int | None
    token_heldout: str | None  # held-out text for the token-level measures
    kind: str | None  # the named study (STUDIES), if any
    posttrain: bool
    accuracy_points: str
    study: str | None = None  # the study key; this and the two below are set by resolve_references
    parent_run: str | None = None
    out_dir: str | None = None
    notes: list[str] | None = None

    @property
    def base(self) -> str:
        """The pre-anneal base every cell starts from."""
        return self.config["model"]["source"]

    def flywheel_config(self) -> FlywheelConfig:
        """The plan's config (sized, world references as paths, the config's own seed)."""
        return validate_config(self.config)

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-able dict (`notes` only once the references are resolved)."""
        data = asdict(self)
        if self.notes is None:
            del data["notes"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AblationPlan:
        """A plan back from `to_json`'s dict."""
        return cls(**copy.deepcopy(data))


# --- world references: the one place the ablation resolves them ---------------------------------


def world_to_path(cfg: FlywheelConfig, ref: str | None) -> str | None:
    """`world:<x>` as the built path (world folders are named by seed, so resolve before the seed changes)."""
    from flywheel.refs import as_ref, local_path

    parsed = None if ref is None else as_ref(ref)
    return ref if parsed is None or parsed.kind != "world" else str(local_path(cfg, parsed))


def _resolved_config(cfg: FlywheelConfig) -> dict[str, Any]:
    """The config as JSON with world references as paths: the same base and data for every seed."""
    data = cfg.model_dump(mode="json")
    data["model"]["source"] = world_to_path(cfg, cfg.model.source)
    data["model"]["tokenizer"] = world_to_path(cfg, cfg.model.tokenizer)
    data["midtrain"]["reference"] = world_to_path(cfg, cfg.midtrain.reference)
    for src in data["data"]["sources"]:
        src["source"] = world_to_path(cfg, src["source"])
    for stage in data["posttrain"]["stages"]:
        stage["data"] = world_to_path(cfg, stage["data"])
    return data


def world_dpo_pairs(plan: AblationPlan) -> str | None:
    """The tiny world's preference pairs, resolved with the plan's own seed (FlywheelError: no world built)."""
    return world_to_path(plan.flywheel_config(), "world:dpo")


def _build_world(cfg: FlywheelConfig) -> None:
    """The tiny world, when the config uses it (its folders are what the references resolve to)."""
    if cfg.uses_world():
        from flywheel.world.build import build_world

        build_world(cfg, ladder=False)


def _heldout_source(cfg: FlywheelConfig, heldout: str | None) -> str | None:
    """Held-out text for KL: the given jsonl, else the tiny world's eval problems if the config uses it."""
    if heldout:
        path = Path(heldout).expanduser()
        if not path.is_file():
            raise FlywheelError(f"heldout: {heldout} is not a file; pass a .jsonl with a 'text' field")
        return str(path.resolve())
    if cfg.uses_world():
        from flywheel.refs import world_paths

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


# --- checking the request ------------------------------------------------------------------------


def _study_request(study: str | None, variants: list[str] | None, size: str) -> tuple[list[str] | None, str]:
    """A named study's variants (or the ones picked among them) and its size unless one is given."""
    if study is None:
        return variants, size
    if study not in STUDIES:
        raise FlywheelError(f"ablation study: must be one of {', '.join(STUDIES)} (got {study!r})")
    members = STUDIES[study].variants
    outside = [v for v in variants or [] if v not in members]
    if outside:
        raise FlywheelError(f"ablation variants: {', '.join(outside)} not in study {study}; --variants with "
                            f"--study picks among {', '.join(members)}")
    return list(variants or members), STUDIES[study].size if size == "config" else size


def _checked_variants(variants: list[str]) -> list[str]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FlywheelError(f"ablation variants: unknown {', '.join(unknown)}; "
                            f"choose from {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise FlywheelError("ablation variants: each variant may be named once")
    return variants


def _seed_list(cfg: FlywheelConfig, seeds: int | list[int]) -> list[int]:
    """`n` seeds from the config's, or the given list; each once."""
    seed_list = [cfg.seed + i for i in range(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise FlywheelError("ablation seeds: need at least one seed, each once")
    return seed_list


def _fraction_list(fractions: tuple[float, ...] | list[float]) -> list[float]:
    """The evaluated fractions of the budget, sorted, the end always among them."""
    out = sorted({float(f) for f in fractions} | {1.0})
    if out[0] <= 0 or out[-1] > 1:
        raise FlywheelError("ablation fractions: each must be in (0, 1]")
    return out


def _sized(cfg: FlywheelConfig, size: str) -> FlywheelConfig:
    """The config with a size's midtrain, posttrain and evaluation overrides."""
    over = SIZES[size]
    data = cfg.model_dump(mode="json")
    for section in ("midtrain", "evaluation"):
        data[section].update(over.get(section, {}))
    if "posttrain" in over:
        data["posttrain"] = {**data["posttrain"], **copy.deepcopy(over["posttrain"])}
    return validate_config(data, f"ablation size {size}")


def _given_references(sized: FlywheelConfig, variants: list[str], given: dict[str, str | None]
                      ) -> dict[str, str | None]:
    """Each reference role as a model folder (None: not given); the RL one defaults to midtrain.reference."""
    from flywheel.refs import model_location

    refs = {"rl": given["rl"] or sized.midtrain.reference, **{r: p for r, p in given.items() if r != "rl"}}
    return {role: model_location(sized, world_to_path(sized, r)) if r else None for role, r in refs.items()}


def _check_strong_reference(variants: list[str], strong_reference: str | None) -> None:
    """Refuse strong-reference variants without one, before the world is built (minutes on a CPU)."""
    if any(VARIANTS[v].reference == "strong" for v in variants) and not strong_reference:
        raise FlywheelError("--strong-reference: the variants guided by the strong reference need one; pass a "
                            "post-trained model folder far better at the tasks (configs/strong-reference.yaml "
                            "builds one on the tiny world)")


def prepare_ablation(cfg: FlywheelConfig, variants: list[str] | None = None,
                     seeds: int | list[int] | None = None, size: str = "config",
                     reference: str | None = None, sft_reference: str | None = None,
                     weak_reference: str | None = None, fractions: tuple[float, ...] | None = None,
                     heldout: str | None = None, heldout_limit: int | None = None,
                     threads: int | None = None, dpo_reference: str | None = None,
                     strong_reference: str | None = None, study: str | None = None) -> AblationPlan:
    """Check the request and fix all a cell needs as a plan; builds the tiny world if used.

    `study` names a set of variants and how their cells run (STUDIES); it sets the size unless one is given,
    and `variants` may then pick some of its variants (a grid run in parts: each cell is reused by content).
    """
    variants, size = _study_request(study, variants, size)
    if size not in SIZES:
        raise FlywheelError(f"ablation size: must be one of {', '.join(SIZES)} (got {size!r})")
    over = SIZES[size]
    threads = threads or over.get("threads")
    use_threads(threads)
    variants = _checked_variants(list(variants or over.get("variants") or VARIANTS))
    seed_list = _seed_list(cfg, seeds if seeds is not None else over.get("seeds", 3))
    fraction_list = _fraction_list(fractions or over.get("fractions") or FRACTIONS)
    _check_strong_reference(variants, strong_reference)
    _build_world(cfg)
    sized = _sized(cfg, size)
    refs = _given_references(sized, variants, {"rl": reference, "sft": sft_reference, "weak": weak_reference,
                                               "dpo": dpo_reference, "strong": strong_reference})
    kind = STUDIES.get(study or "", Study(variants=[], size=size))
    return AblationPlan(
        version=ABLATION_VERSION, name=cfg.name, size=size, variants=variants, seeds=seed_list,
        fractions=fraction_list, config=_resolved_config(sized), references=refs, bootstrapped=[],
        heldout=_heldout_source(cfg, heldout), heldout_limit=heldout_limit or over.get("heldout_limit", 200),
        threads=threads, token_heldout=_token_heldout(cfg, heldout), kind=study, posttrain=kind.posttrain,
        accuracy_points=kind.accuracy_points,
    )


# --- what each cell runs -------------------------------------------------------------------------


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process (None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def cell_config(plan: AblationPlan, variant: str, seed: int, data_source: str | None = None) -> FlywheelConfig:
    """The plan's config with one variant's mid-training settings and one seed."""
    v = VARIANTS[variant]
    data = copy.deepcopy(plan.config)
    data["seed"] = seed
    data["midtrain"].update({"objective": v.objective, "reference": None, **v.midtrain})
    data["midtrain"]["token_budget"] *= v.budget_scale
    if data_source is not None:
        data["data"]["sources"] = [{"source": data_source, "weight": 1.0, "text_field": "text"}]
    return validate_config(data, f"ablation variant {variant}")


def cell_seeds(plan: AblationPlan, variant: str) -> list[int]:
    """The seeds a variant runs: all of the plan's, or its first `max_seeds`."""
    cap = VARIANTS[variant].max_seeds
    return plan.seeds[:cap] if cap else plan.seeds

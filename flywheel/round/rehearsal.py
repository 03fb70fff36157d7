"""`flywheel rehearse CONFIG`: a paper-scale config's rounds in miniature on a CPU, everything real except size.

What stays real: the model's architecture class and its vocabulary, the tokenizer and its chat template, every
data source read by the project's own readers in its own format and schema, the TRL arguments, the evaluation's
tasks and metric names, the promotion rule and guards, the launcher. What shrinks: the model (2 layers, width
64, freshly initialised), the data (the first N documents or rows of each source), the steps, the items per
task, the processes (2 on the CPU, gloo). What cannot run on a CPU (bf16 compute, the fused kernel, vLLM, flash
attention, GPU launch files) is replaced by its CPU equivalent, one line each. The rehearsal lives in a home of
its own under a name of its own, and every run and model version it writes carries the flywheel.rehearsal tag,
so nothing it writes can be taken for a real round or reused by one.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import FlywheelConfig, validate_config
from flywheel.data.io import write_jsonl
from flywheel.errors import FlywheelError

SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "head_dim": 16}  # the model in miniature; the vocabulary and everything else stay as configured
SEQ_LEN = 64  # tokens per mid-training window
TEXT_LIMITS = {"max_length": 256, "max_prompt_length": 128, "max_completion_length": 32}  # TRL's lengths, capped
GPU_ARGS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval")  # TRL arguments a CPU cannot honour
EVAL_ITEMS = 8  # items per task
PROCESSES = 2  # where the config launches torchrun or accelerate


@dataclass
class Rehearsal:
    """The rehearsal's own config (written to `path`), and what it changed besides size."""

    path: Path
    cfg: FlywheelConfig
    replaced: list[str] = field(default_factory=list)  # one line per GPU-only setting replaced
    unreachable: list[str] = field(default_factory=list)  # evaluation tasks whose data could not be reached


def rehearsal_home(cfg: FlywheelConfig) -> Path:
    return cfg.home / "rehearsals" / cfg.name


def rehearsal_name(cfg: FlywheelConfig) -> str:
    return f"{cfg.name}-rehearsal"[:64]


def fresh_home(cfg: FlywheelConfig) -> Path:
    """The rehearsal's home, emptied: a rehearsal starts from nothing (its rounds are 0, 1, ...); only its
    Prefect store stays (a running Prefect may hold it)."""
    home = rehearsal_home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    for old in home.iterdir():
        if old.name != "prefect":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return home


def prepare(cfg: FlywheelConfig, rows: int = 64, steps: int = 2) -> Rehearsal:
    """Write the rehearsal's models, data samples and config under its home (fresh_home); nothing trains yet."""
    home = rehearsal_home(cfg)
    (home / "data").mkdir(parents=True, exist_ok=True)
    data = cfg.model_dump(mode="json")
    replaced: list[str] = []
    data.update(name=rehearsal_name(cfg), home=str(home))
    data["tracking"] = {**data["tracking"], "uri": None, "rehearsal": True}
    _models(cfg, data, home, replaced)
    _midtrain_sources(cfg, data, home, rows, steps)
    _posttrain_stages(cfg, data, home, rows, steps, replaced)
    unreachable = _evaluation(cfg, data, replaced)
    _launch(data, home, replaced)
    path = home / "rehearsal.yaml"
    rcfg = validate_config(data, str(path))
    path.write_text(yaml.safe_dump(rcfg.model_dump(mode="json"), sort_keys=False))
    return Rehearsal(path, rcfg, replaced, unreachable)


# --- the model -------------------------------------------------------------------------------------------


def shrink_config(conf: Any) -> Any:
    """The same architecture class at SHAPE's size: per-layer lists cut to the new depth, heads kept in ratio."""
    layers = getattr(conf, "num_hidden_layers", None)
    heads = getattr(conf, "num_attention_heads", None)
    kv = getattr(conf, "num_key_value_heads", None)
    for name, value in SHAPE.items():
        if getattr(conf, name, None) is not None:
            setattr(conf, name, value)
    if kv is not None and heads:
        conf.num_key_value_heads = max(1, SHAPE["num_attention_heads"] * kv // heads)
    for name, value in list(vars(conf).items()):  # e.g. SmolLM3's no_rope_layers, layer_types: one entry a layer
        if layers and isinstance(value, list) and len(value) == layers:
            setattr(conf, name, value[:SHAPE["num_hidden_layers"]])
    return conf


def _models(cfg: FlywheelConfig, data: dict[str, Any], home: Path, replaced: list[str]) -> None:
    """The base (and round 1's reference) in miniature, each with its own real tokenizer, in float32."""
    data["model"] |= {"source": str(_shrunk(cfg, "model.source", cfg.model.source, cfg.model.tokenizer,
                                            home / "models" / "base", cfg.seed)),
                      "tokenizer": None, "revision": None}
    if cfg.midtrain.reference:
        data["midtrain"]["reference"] = str(_shrunk(cfg, "midtrain.reference", cfg.midtrain.reference, None,
                                                    home / "models" / "reference", cfg.seed + 1))
    settings = {"dtype": ("float32", "bf16/fp16 compute is for GPUs"), "attn_implementation": ("sdpa", "needs a GPU"),
                "compile": (False, "compiling a 2-layer model costs more than it saves")}
    for key, (cpu, why) in settings.items():
        if data["model"][key] != cpu:
            replaced.append(f"model.{key}: {data['model'][key]} -> {cpu} ({why})")
            data["model"][key] = cpu
    if data["midtrain"]["loss_kernel"] == "fused":
        replaced.append("midtrain.loss_kernel: fused -> chunked (the fused kernel is Triton, GPU only)")
        data["midtrain"]["loss_kernel"] = "chunked"


def _shrunk(cfg: FlywheelConfig, where: str, ref: str, tokenizer: str | None, out: Path, seed: int) -> Path:
    """A freshly initialised model of `ref`'s class and vocabulary at SHAPE's size, saved with `ref`'s tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from flywheel.models import load_tokenizer
    from flywheel.refs import model_location

    location = model_location(cfg, ref)
    try:
        conf = AutoConfig.from_pretrained(location, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FlywheelError(f"{where}: cannot read the model configuration of {ref} "
                            f"({str(exc).splitlines()[0]}); point {where} at a local copy (a folder with "
                            "config.json and the tokenizer files)") from None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shrink_config(conf), torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(cfg, tokenizer or ref).save_pretrained(out)
    return out


# --- the data --------------------------------------------------------------------------------------------


def _midtrain_sources(cfg: FlywheelConfig, data: dict[str, Any], home: Path, rows: int, steps: int) -> None:
    """Each source's first `rows` documents, read by the store's own reader (its format, subset and text field),
    as one small file in its place; the budget is `steps` optimizer steps of SEQ_LEN windows."""
    from flywheel.data.store import source_texts

    sources = []
    for i, src in enumerate(cfg.data.sources):
        texts = []
        for text in source_texts(cfg, src):
            texts.append({"text": text})
            if len(texts) == rows:
                break
        if not texts:
            raise FlywheelError(f"data.sources.{i}: {src.source} has no documents with a '{src.text_field}' "
                                "field; check the path, include/exclude and text_field")
        write_jsonl(home / "data" / f"midtrain-{i}.jsonl", texts)
        sources.append({"source": str(home / "data" / f"midtrain-{i}.jsonl"), "weight": src.weight})
    data["data"] |= {"sources": sources, "fetch_above_tokens": 0}
    mt = data["midtrain"]
    seq_len = min(mt["seq_len"], SEQ_LEN)
    world = _processes(cfg.launch.for_stage("midtrain").model_dump())
    mt |= {"seq_len": seq_len, "batch_size": 2, "grad_accum": 1, "score_batch_size": 4,
           "token_budget": steps * 2 * world * seq_len, "loss_chunk_tokens": 256}


def _posttrain_stages(cfg: FlywheelConfig, data: dict[str, Any], home: Path, rows: int, steps: int,
                      replaced: list[str]) -> None:
    """Each stage on its data's first `rows` rows (its own split and subset), for `steps` steps, small batches."""
    from flywheel.posttrain.data import read_source

    for i, stage in enumerate(cfg.posttrain.stages):
        where = f"posttrain.stages.{i}"
        out = data["posttrain"]["stages"][i]
        if stage.data:
            got, _, _ = read_source(cfg, stage.data, stage.args.get("split", "train"), stage.args.get("subset"),
                                    field=f"{where}.data", limit=rows)
            write_jsonl(home / "data" / f"posttrain-{i}.jsonl", got)
            out["data"] = str(home / "data" / f"posttrain-{i}.jsonl")
        args = dict(stage.args)
        for key in GPU_ARGS:
            if args.pop(key, None):
                replaced.append(f"{where}.args.{key}: true -> removed (a CPU trains in float32)")
        if args.pop("use_vllm", None):
            replaced.append(f"{where}.args.use_vllm: true -> false (vLLM needs a GPU)")
        args = {k: min(v, TEXT_LIMITS[k]) if k in TEXT_LIMITS and isinstance(v, int) else v for k, v in args.items()}
        for key in ("subset", "split"):  # the sample is a file of its own now
            args.pop(key, None)
        if stage.kind == "grpo":
            args |= {"num_generations": 2, "max_completion_length": min(args.get("max_completion_length", 32), 32)}
        args.pop("gradient_accumulation_steps", None)
        out |= {"max_steps": steps, "batch_size": 2, "args": args}


# --- evaluation, promotion, launch ------------------------------------------------------------------------


def _evaluation(cfg: FlywheelConfig, data: dict[str, Any], replaced: list[str]) -> list[str]:
    """The config's tasks whose data can be reached, EVAL_ITEMS items each; guards on the others are dropped.
    With none reachable, the bundled offline tasks stand in so that the gate still has items to compare."""
    from flywheel.round.checks import check_gate_metric, evaluated_tasks

    check_gate_metric(cfg)  # a guard on a metric the tasks never report: the config's error, not the sample's
    tasks = evaluated_tasks(cfg)
    unreachable = [t for t in tasks if not _reachable(t)]
    kept = [t for t in tasks if t not in unreachable] or ["world"]
    if kept == ["world"] and tasks != kept:
        replaced.append("evaluation.tasks: none reachable -> world (the bundled offline tasks), so the gate has "
                        "items to compare")
    ev = data["evaluation"]
    if ev["backend"] == "vllm":
        replaced.append("evaluation.backend: vllm -> hf (vLLM needs a GPU)")
    ev |= {"tasks": kept, "backend": "hf", "limit": min(ev["limit"] or EVAL_ITEMS, EVAL_ITEMS), "batch_size": 4}
    promo = data["promotion"]
    gone = [g for g in promo["guards"] if any(g["metric"].startswith(f"eval/{t}/") for t in unreachable)]
    for g in gone:
        replaced.append(f"promotion.guards: {g['metric']} dropped (its task's data could not be reached)")
    promo["guards"] = [g for g in promo["guards"] if g not in gone]
    if any(promo["metric"].startswith(f"eval/{t}/") for t in unreachable):
        replaced.append(f"promotion.metric: {promo['metric']} -> eval/avg (its task's data could not be reached)")
        promo["metric"] = "eval/avg"
    promo["resamples"] = min(promo["resamples"], 200)
    if promo["approval"] == "required":  # nobody approves a rehearsal: its gate decides, the checklist says so
        replaced.append("promotion.approval: required -> auto (a rehearsal's rounds decide by their gate)")
        promo["approval"] = "auto"
    return unreachable


def _reachable(task: str) -> bool:
    """Whether lm-eval can build the task here: its dataset downloaded or cached (the bundled ones always).
    Each dataset is asked of the hub once, without retries (offline: found in the cache or not), before lm-eval
    tries to load it."""
    from flywheel.evaluation.registry import BUNDLED, full_task_manager, task_datasets
    from flywheel.hub import check_hub_access, hub_cached, offline_switch

    if task in BUNDLED:
        return True
    for path in task_datasets(task):
        if offline_switch("dataset") and not hub_cached(path, "dataset"):
            return False
        try:
            check_hub_access(None, path, "dataset")
        except FlywheelError:
            return False
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([task], full_task_manager())
    except Exception:  # noqa: BLE001 - any loader failure (offline, gated, moved) means: not reachable from here
        return False
    return True


def _processes(launch: dict[str, Any]) -> int:
    return PROCESSES if launch.get("kind", "local") != "local" else 1


def _launch(data: dict[str, Any], home: Path, replaced: list[str]) -> None:
    """torchrun and accelerate jobs as PROCESSES CPU processes on this machine (gloo); GPU launch files rewritten."""
    top = data["launch"]
    specs = [("launch", top)] + [(f"launch.stages.{name}", spec) for name, spec in top["stages"].items()]
    for where, spec in specs:
        if spec.get("kind", top["kind"]) == "local":
            continue
        if spec.get("nproc_per_node") not in (None, PROCESSES) or spec.get("nnodes", 1) != 1:
            replaced.append(f"{where}: {spec.get('nnodes', 1)} node(s) x {spec['nproc_per_node']} processes -> "
                            f"1 x {PROCESSES} CPU processes (gloo)")
        if spec.get("nproc_per_node") is not None or where == "launch":
            spec["nproc_per_node"] = PROCESSES
        spec |= {"nnodes": 1, "rdzv_endpoint": None}
        if spec.get("config_file"):
            spec["config_file"] = str(_cpu_accelerate_file(Path(spec["config_file"]), home, where, replaced))


def _cpu_accelerate_file(path: Path, home: Path, where: str, replaced: list[str]) -> Path:
    """An accelerate config for PROCESSES CPU processes: no bf16, no GPU ids, one machine, a free local port."""
    try:
        conf = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FlywheelError(f"{where}.config_file: cannot read {path} ({exc.strerror}); fix the path") from None
    if conf.get("distributed_type") == "FSDP":
        replaced.append(f"{where}.config_file: FSDP -> DDP (accelerate keeps its FSDP plugin only on GPUs; "
                        "bench/gpu_fsdp_check.sh checks the sharded path)")
    if conf.get("mixed_precision") not in (None, "no"):
        replaced.append(f"{where}.config_file: mixed_precision {conf['mixed_precision']} -> no (CPU)")
    conf |= {"num_processes": PROCESSES, "num_machines": 1, "machine_rank": 0, "mixed_precision": "no",
             "main_process_ip": "127.0.0.1", "main_process_port": _free_port()}
    conf.pop("gpu_ids", None)
    out = home / f"accelerate-{path.stem}.yaml"
    out.write_text(yaml.safe_dump(conf, sort_keys=False))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight(cfg: FlywheelConfig) -> str:
    """The checks a round makes before it starts, plus those it would make only at the post-training stage (each
    stage's data sample read, mapped and checked; TRL's own checks of every stage's arguments)."""
    from flywheel.models import load_tokenizer
    from flywheel.posttrain.chain import check_posttrain, check_reply_markers, plan_stages, trl_config
    from flywheel.round.checks import check_gate_metric

    check_gate_metric(cfg)
    check_posttrain(cfg)
    tok = load_tokenizer(cfg)
    plans = plan_stages(cfg)
    for plan in plans:
        check_reply_markers(cfg, plan, tok)
        trl_config(cfg, plan, cfg.home / "preflight" / f"{plan.index}-{plan.kind}")
    return f"{len(plans)} post-training stage(s) and their data, the gate's metrics"

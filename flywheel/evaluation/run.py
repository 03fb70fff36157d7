"""`evaluate(cfg, checkpoint, kind=...)`: lm-eval on one checkpoint, flat metrics out, results and samples on disk.

The protocol: a base (pre-trained or mid-trained) model is evaluated few-shot on plain text; a
post-trained model zero-shot through its chat template. Greedy decoding and fixed seeds make
the same checkpoint and config score the same every time.

`evaluation.backend` picks lm-eval's model: `hf` (transformers; a launched job's ranks split the
requests) or `vllm` (one vLLM replica per visible GPU, started by lm-eval through ray from one process).
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flywheel.config import FlywheelConfig
from flywheel.data.io import distributed_rank, fingerprint, write_json, write_jsonl
from flywheel.errors import FlywheelError
from flywheel.evaluation.items import ITEMS_FILE, item_scores
from flywheel.evaluation.likelihood import companions, fold
from flywheel.evaluation.registry import UNSAFE, TaskSpec, resolve_tasks, task_manager
from flywheel.metrics import AVG, by_task, flatten_results, primary_metric

Kind = Literal["base", "post"]
KINDS = ("base", "post")
SEED = 1234  # lm-eval's default few-shot/numpy/torch seed, fixed here so a rerun picks the same examples
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
# With a chat template the prompt is the user turn: keep it exactly the question, as in the SFT data
# (the YAML's trailing newline is the plain-text document format a base model reads).
CHAT_PROMPTS = {"world_gsm": "{{question}}"}
_KEEP = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
         "config", "lm_eval_version", "transformers_version")
VLLM_MEMORY = 0.8  # of each GPU for vLLM's weights and KV cache: headroom for CUDA graphs and the sampler


@dataclass
class EvalResult:
    """What one evaluation produced: flat metrics, and where the full results and per-sample outputs are."""

    metrics: dict[str, float]
    results_path: Path
    samples_path: Path
    kind: str
    checkpoint: str
    seconds: float = 0.0
    items_path: Path | None = None  # per-item scores for the paired promotion gate (evaluation/items.py)
    backend: str = "hf"  # evaluation.backend: the lm-eval model that produced the scores


def eval_dir(cfg: FlywheelConfig, checkpoint: str, kind: str) -> Path:
    """The default output folder: named by what decides the scores (checkpoint, kind, evaluation settings)."""
    key = fingerprint(checkpoint, kind, cfg.model.dtype, cfg.evaluation.cache_fields())
    return cfg.home / "evals" / key


def _visible_gpus() -> int:
    """CUDA GPUs this process can use (CUDA_VISIBLE_DEVICES applied); 0 on a CPU-only machine."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_backend(cfg: FlywheelConfig) -> None:
    """`evaluation.backend: vllm` needs the vllm package and a CUDA GPU (and ray for several): one sentence if not.

    Cheap (no model, no lm-eval import): config validation can call it before a round does any work.
    """
    if cfg.evaluation.backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise FlywheelError("evaluation.backend: vllm needs the vllm package, which is not installed; "
                            "pip install -e '.[vllm]' or set backend: hf")
    gpus = _visible_gpus()
    if gpus == 0:
        raise FlywheelError("evaluation.backend: vllm needs a CUDA GPU, which this machine lacks; set backend: hf")
    if gpus > 1 and importlib.util.find_spec("ray") is None:
        raise FlywheelError(f"evaluation.backend: vllm runs one replica on each of the {gpus} GPUs through ray, "
                            "which is not installed; pip install ray, or show it one GPU (CUDA_VISIBLE_DEVICES)")


def lm_eval_model(cfg: FlywheelConfig, model: str, tokenizer: str | None, gpus: int = 1) -> tuple[str, dict[str, Any]]:
    """lm-eval's model name and model_args for the config's backend; `gpus` (vllm) is the data-parallel size."""
    args: dict[str, Any] = {"pretrained": model, "dtype": cfg.model.dtype,
                            "trust_remote_code": cfg.model.trust_remote_code}
    if tokenizer:
        args["tokenizer"] = tokenizer
    if cfg.evaluation.backend == "hf":
        return "hf", args | {"use_safetensors": True}
    from flywheel.models import max_positions

    # What the hf backend truncates prompts to (the config's positions), so both see the same text; a hub id's
    # config is not read here, and vLLM takes the length from it itself.
    positions = max_positions(model)
    return "vllm", args | {"tensor_parallel_size": 1, "data_parallel_size": gpus,
                           "gpu_memory_utilization": VLLM_MEMORY, "max_model_len": positions, "seed": SEED}


def _has_tokenizer(folder: Path) -> bool:
    """Mid- and post-training save the tokenizer beside the weights; older folders may not have one."""
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def _resolve_checkpoint(cfg: FlywheelConfig, checkpoint: str | Path) -> tuple[str, str | None]:
    """The model to load and, when its folder has none, the tokenizer the config names; clear errors otherwise."""
    from flywheel.refs import model_location

    ref = model_location(cfg, str(checkpoint))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FlywheelError(f"{checkpoint}: not a model folder (no config.json); pass a saved checkpoint folder")
        tokenizer = None if _has_tokenizer(path) else model_location(cfg, cfg.model.tokenizer or cfg.model.source)
        return str(path.resolve()), tokenizer
    if isinstance(checkpoint, Path) or ref.startswith(("/", "./", "../", "~")):
        raise FlywheelError(f"{checkpoint}: checkpoint folder not found; check the path")
    return ref, None  # a hub id: loaded from the local HF cache, or the hub when online


def _shots(spec: TaskSpec, kind: str, cfg: FlywheelConfig) -> int | None:
    """Post-trained models answer zero-shot; bases get the config's count, else the preset's."""
    if kind == "post":
        return 0
    return cfg.evaluation.num_fewshot if cfg.evaluation.num_fewshot is not None else spec.fewshot


def _load_tasks(specs: list[TaskSpec], kind: str, cfg: FlywheelConfig, tm: Any) -> list[Any]:
    """Build every task (and read its data) before the model loads, each with its own few-shot count."""
    objects: list[Any] = []
    for spec in specs:
        try:
            loaded = tm.load([spec.name])
        except Exception as exc:  # dataset and hub errors come in many types; name the task either way
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FlywheelError(
                f"evaluation task '{spec.name}': could not load its data ({first}); hub tasks need the dataset "
                "in the local HF cache or network access"
            ) from None
        shots = _shots(spec, kind, cfg)
        for name, task in loaded["tasks"].items():
            if shots is not None:
                task.set_config(key="num_fewshot", value=shots)
            if kind == "post" and name in CHAT_PROMPTS:
                task.set_config(key="doc_to_text", value=CHAT_PROMPTS[name])
        top = loaded["groups"].get(spec.name, loaded["tasks"].get(spec.name))
        objects += [top] if top is not None else list(loaded["tasks"].values())  # a tag: its member tasks
    return objects


def _jsonable(obj: Any) -> Any:
    """lm-eval output holds tuples, numpy numbers and callables; keep what JSON can say, stringify the rest."""
    return json.loads(json.dumps(obj, default=str))


def _sample_rows(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per evaluated document: the exact prompt, what the model answered, and how it scored."""
    for task, samples in sorted(results.get("samples", {}).items()):
        for s in samples:
            args = s["arguments"]
            row: dict[str, Any] = {"task": task, "doc_id": s["doc_id"], "prompt": args[0][0]}
            if "request" in s:  # a gold-likelihood request beside the task's own (evaluation/likelihood.py)
                row["request"] = s["request"]
            continuations = [a[1] for a in args if isinstance(a[1], str)]
            if continuations:
                row["continuations"] = continuations
            row.update(target=s["target"], response=s["filtered_resps"], filter=s["filter"],
                       scores={m: s[m] for m in s["metrics"] if m in s}, doc=s["doc"])
            yield _jsonable(row)


def _simple_evaluate(cfg: FlywheelConfig, kind: str, specs: list[TaskSpec], tasks: list[Any], tm: Any,
                     model: str, tokenizer: str | None) -> dict[str, Any] | None:
    """lm-eval's `simple_evaluate` with the backend's model, greedy and seeded (None on a non-zero hf rank)."""
    from lm_eval import simple_evaluate

    gpus = _visible_gpus()
    name, model_args = lm_eval_model(cfg, model, tokenizer, gpus)
    vllm = name == "vllm"
    return simple_evaluate(
        model=name,
        model_args=model_args,
        tasks=tasks,
        task_manager=tm,
        device=None if vllm else "cuda" if gpus else "cpu",  # vLLM places itself (one replica per GPU)
        batch_size="auto" if vllm else cfg.evaluation.batch_size,  # vLLM schedules every request at once
        limit=cfg.evaluation.limit,
        bootstrap_iters=0,
        apply_chat_template=kind == "post",
        fewshot_as_multiturn=kind == "post",
        confirm_run_unsafe_code=any(s.name in UNSAFE for s in specs),
        random_seed=0,
        numpy_random_seed=SEED,
        torch_random_seed=SEED,
        fewshot_random_seed=SEED,
    )


def evaluate(cfg: FlywheelConfig, checkpoint: str | Path, *, kind: Kind = "base",
             out_dir: str | Path | None = None) -> EvalResult:
    """Run the config's lm-eval tasks on a checkpoint; backend and task names are checked before any model loads."""
    if kind not in KINDS:
        raise FlywheelError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    check_backend(cfg)
    backend = cfg.evaluation.backend
    t0 = time.perf_counter()
    specs = resolve_tasks(cfg.evaluation.tasks)
    model, tokenizer = _resolve_checkpoint(cfg, checkpoint)
    if backend == "vllm" and distributed_rank()[0] != 0:  # rank 0 starts a replica on every GPU; the rest wait
        return EvalResult({}, None, None, kind, model, time.perf_counter() - t0, backend=backend)
    tm = task_manager(specs)
    tasks = _load_tasks(specs, kind, cfg, tm)
    extra = companions(tasks) if cfg.evaluation.likelihood else []  # gold-solution bpb, folded in below
    try:
        results = _simple_evaluate(cfg, kind, specs, tasks + extra, tm, model, tokenizer)
    except OSError as exc:  # transformers reports a missing or unreadable model as OSError
        raise FlywheelError(f"{checkpoint}: could not load the model ({str(exc).splitlines()[0]})") from None

    if results is None:  # a rank other than 0 of a data-parallel run: lm-eval gathered its scores on rank 0
        return EvalResult({}, None, None, kind, model, time.perf_counter() - t0, backend=backend)
    fold(results, {c.config.task: c.parent_name for c in extra})  # before anything reads the results
    metrics = flatten_results(results)
    folder = Path(out_dir) if out_dir is not None else eval_dir(cfg, model, kind)
    samples_path = folder / SAMPLES_FILE
    results_path = folder / RESULTS_FILE
    write_jsonl(samples_path, _sample_rows(results))
    items_path = folder / ITEMS_FILE
    write_json(items_path, item_scores(results, protocol(cfg, kind) | {"versions": _jsonable(results.get("versions", {}))}))
    write_json(results_path, _jsonable({
        "checkpoint": model, "kind": kind, "backend": backend, "tasks": [s.name for s in specs],
        "limit": cfg.evaluation.limit, "metrics": metrics, "lm_eval": {k: results[k] for k in _KEEP if k in results},
    }))  # fmt: skip
    return EvalResult(metrics, results_path, samples_path, kind, model, time.perf_counter() - t0, items_path,
                      backend)


def protocol(cfg: FlywheelConfig, kind: str) -> dict[str, Any]:
    """What decides which items and prompts an evaluation has: two results pair only when these agree."""
    found = {"tasks": list(cfg.evaluation.tasks), "limit": cfg.evaluation.limit,
             "num_fewshot": cfg.evaluation.num_fewshot, "kind": kind}
    # Another engine can decode another answer to the same prompt: do not pair vllm items with hf ones. hf adds
    # no key, so items written before the backend existed still pair.
    return found if cfg.evaluation.backend == "hf" else found | {"backend": cfg.evaluation.backend}


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table of task, metric and score (primary metrics marked, the average last) for the CLI."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("task")
    table.add_column("metric")
    table.add_column("score", justify="right")
    for task, values in by_task(metrics).items():
        primary = primary_metric(task, values)
        for metric, value in values.items():
            table.add_row(task, f"{metric} *" if metric == primary else metric, f"{value:.4f}")
    if AVG in metrics:
        table.add_row("average", "primary metrics (*)", f"{metrics[AVG]:.4f}", style="bold")
    console = Console(width=100, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def print_table(result: EvalResult) -> None:
    """Print an evaluation's table with where its files are, as `flywheel evaluate` shows it."""
    print(f"{result.kind} evaluation of {result.checkpoint} ({result.backend}, {result.seconds:.0f} s)")
    print(format_table(result.metrics), end="")
    print(f"results: {result.results_path}\nsamples: {result.samples_path}")

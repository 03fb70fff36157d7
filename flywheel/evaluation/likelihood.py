"""Bits per byte of the gold solution: a likelihood score beside the accuracy of each task that has one.

Accuracy on a few hundred items moves in steps of a fraction of a point and its noise is several
points, so it cannot see the ~1% effects one round of training has on a small model. AI2's OLMES
scores small models by the bits per byte (bpb) of the gold continuation instead: a continuous
number per item that moves long before the answers flip. Here every evaluated task with a gold
solution (`GOLD_TARGETS`) gets a companion lm-eval task that reads the same documents with the
same prompt (few-shot examples, chat template and all) and asks the model, in one `loglikelihood`
request per document, how probable the gold solution is:

    bpb = -log p(continuation | prompt) / (ln 2 × UTF-8 bytes of the continuation)

The continuation is exactly what the model scored: the task's target delimiter and the gold text,
after any whitespace that ended the prompt (lm-eval's `_encode_pair` moves it there; the companion
moves it itself, so the saved prompt and continuation are the scored ones). `fold` then puts the
companion's scores into its parent task's entry of `simple_evaluate`'s output, so flywheel sees
`eval/<task>/bpb` and per-item `scores[<task>]["bpb"]` and never the companion as a task of its own.
Lower is better; bpb is never a primary metric, so `eval/avg` does not change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

METRIC = "bpb"
SUFFIX = "__gold_bpb"  # companion task names: internal, never reported (fold removes them)
REQUEST = "gold_loglikelihood"  # marks the companion's samples among their parent task's
_MINERVA = ("algebra", "counting_and_prob", "geometry", "intermediate_algebra", "num_theory", "prealgebra", "precalc")
_GSM8K_GOLD = "{{answer if answer is defined else target}}"  # gsm8k_cot's few-shot samples have `target` only

# lm-eval task -> Jinja template of its gold solution, with the field names of the installed task YAMLs
# (lm_eval/tasks/gsm8k/, lm_eval/tasks/minerva_math/ after utils.process_docs).
GOLD_TARGETS: dict[str, str] = {
    "world_gsm": "{{solution}}",
    "gsm8k": _GSM8K_GOLD,
    "gsm8k_cot": _GSM8K_GOLD,
    **{f"minerva_math_{subject}": "{{solution}}" for subject in _MINERVA},  # the members of group minerva_math
}


def _doc_key(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, default=str)


def _delimiter(config: Any, chat: bool) -> str:
    """What goes between the prompt and the gold text: lm-eval's rule for multiple-choice continuations."""
    if not chat:
        return config.target_delimiter
    prefix = config.gen_prefix
    return config.target_delimiter if prefix and not prefix[-1].isspace() else ""


def _split(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation, as lm-eval's `_encode_pair` would."""
    stripped = context.rstrip()
    if not stripped or stripped == context:
        return context, continuation
    return stripped, context[len(stripped):] + continuation


@functools.cache
def _task_class() -> type:
    """The companion task class (built on first use: importing lm-eval takes seconds)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import apply_template

    class GoldLikelihoodTask(ConfigurableTask):
        """One `loglikelihood` request per document: the parent's prompt, the gold solution as continuation."""

        def __init__(self, parent: Any, template: str, config: dict[str, Any]) -> None:
            self.parent_name = parent.config.task
            self._parent_dataset = parent.dataset
            self._bytes: dict[str, int] = {}  # document -> UTF-8 bytes of its scored continuation
            # A function of the byte counts, not a bound method: lm-eval deep-copies the config when it dumps it,
            # and a bound method would drag the whole task (datasets included) along.
            config = config | {"doc_to_target": functools.partial(apply_template, template),
                               "process_results": functools.partial(_bpb, self._bytes)}
            super().__init__(config=config)

        def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            self.dataset = self._parent_dataset  # the parent's documents, already loaded: nothing is read again

        def construct_requests(self, doc: dict, ctx: Any, **kwargs: Any) -> Any:
            chat = bool(kwargs.get("apply_chat_template", False))
            request = super().construct_requests(doc, ctx, **kwargs)
            context, continuation = _split(ctx, _delimiter(self.config, chat) + str(request.arguments[1]))
            request.arguments = (context, continuation)
            self._bytes[_doc_key(doc)] = len(continuation.encode("utf-8"))
            return request

    return GoldLikelihoodTask


def _bpb(n_bytes: Mapping[str, int], doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """The companion's process_results: the request's log-likelihood (nats) in bits per continuation byte."""
    loglikelihood = results[0][0]
    return {METRIC: -loglikelihood / (math.log(2) * n_bytes[_doc_key(doc)])}


def companion(task: Any) -> Any | None:
    """The gold-likelihood companion of a loaded leaf task, or None when it has no gold target (or a prompt
    this cannot mirror: choices, promptsource, images or audio).

    Built from the task's config as the caller left it (few-shot count, prompt, delimiters, few-shot
    settings), so it sees the prompt the task sees; only what is scored and how differs.
    """
    name = getattr(task.config, "task", None)
    template = GOLD_TARGETS.get(name)
    src = task.config
    if template is None or src.doc_to_choice is not None or src.use_prompt or src.doc_to_image or src.doc_to_audio:
        return None
    config = {f.name: getattr(src, f.name) for f in dataclasses.fields(src)}
    fewshot = src.fewshot_config
    config.update(
        task=f"{name}{SUFFIX}", task_alias=None, tag=None, output_type="loglikelihood", generation_kwargs=None,
        filter_list=None, repeats=1, metadata=dict(src.metadata or {}),
        fewshot_config=dataclasses.replace(fewshot) if dataclasses.is_dataclass(fewshot) else fewshot,
        metric_list=[{"metric": METRIC, "aggregation": "mean", "higher_is_better": False}],
    )  # fewshot_config keeps the parent's doc_to_target: the few-shot examples are the parent's own
    return _task_class()(task, template, config)


def companions(tasks: list[Any]) -> list[Any]:
    """A companion for every leaf task in `tasks` (groups searched, members included) that has a gold target."""
    from lm_eval.api.group import Group

    leaves = [leaf for t in tasks for leaf in (t.get_all_tasks() if isinstance(t, Group) else [t])]
    made = [c for leaf in leaves if (c := companion(leaf)) is not None]  # a group's own row: see fold
    taken = {leaf.config.task for leaf in leaves}
    return [c for c in made if c.config.task not in taken]  # never shadow a task the config asked for


def fold(results: dict[str, Any], parents: Mapping[str, str]) -> dict[str, Any]:
    """Move each companion's output ({companion: parent}) into its parent's entries, in place.

    results[parent] gains `bpb,none` (and its stderr); higher_is_better[parent] gains bpb: False; the
    companion's samples join samples[parent], each marked `request: gold_loglikelihood`, so per-item
    scores come out as scores[parent]["bpb"] beside the task's own metrics. Every other trace of the
    companion (configs, versions, n-shot, n-samples, group_subtasks) is dropped. A group's row gets no bpb:
    a group's bpb is the pool of its members' bpb items, which items.metric_terms already forms on request.
    """
    for name, parent in parents.items():
        row = results.get("results", {}).pop(name, {})
        if parent in results.get("results", {}):
            results["results"][parent].update({k: v for k, v in row.items() if "," in k})
        better = results.get("higher_is_better", {})
        if name in better:
            better.setdefault(parent, {}).update(better.pop(name))
        for key in ("configs", "versions", "n-shot", "n-samples", "group_subtasks", "task_hashes"):
            if isinstance(results.get(key), dict):
                results[key].pop(name, None)
        samples = results.get("samples", {}).pop(name, None) if isinstance(results.get("samples"), dict) else None
        if samples is not None:
            results["samples"].setdefault(parent, []).extend(s | {"request": REQUEST} for s in samples)
    return results

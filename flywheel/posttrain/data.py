"""A stage's data: from the tiny world, a local file or the hub; renamed, checked, shaped as conversations.

Post-trained models are used with the chat template, so every stage trains on conversations: prompts become
`[{"role": "user", ...}]`, completions/chosen/rejected become `[{"role": "assistant", ...}]`. Problems are
reported before any training starts, as one sentence naming the file, the columns found and those needed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig
from flywheel.data.io import file_fingerprint, fingerprint
from flywheel.data.kinds import kind_of
from flywheel.errors import FlywheelError
from flywheel.hub import check_hub_access, worded_hub_call
from flywheel.refs import DATA_REF, Ref, as_ref, local_path

MESSAGE_COLUMNS = ("completion", "chosen", "rejected")
# usual source names for the columns we need, to suggest a `columns:` mapping that is likely right
USUAL_NAMES = {"prompt": ("question", "problem", "instruction", "input", "query"),
               "completion": ("solution", "response", "output"), "tests": ("test_list", "test"),
               "chosen": ("chosen_response", "preferred", "accepted"),
               "rejected": ("rejected_response", "dispreferred"),
               "answer": ("final_answer", "target", "label", "gold"),
               "messages": ("conversations", "conversation", "dialog", "chat")}


@dataclass
class StageData:
    """Rows ready for a TRL trainer, where they came from, and a fingerprint for the cache key."""

    rows: list[dict[str, Any]]
    source: str
    fingerprint: str


def read_source(cfg: FlywheelConfig, ref: Ref | str, split: str = "train", subset: str | None = None,
                field: str | None = None, limit: int | None = None) -> tuple[list[dict[str, Any]], str, str]:
    """Rows, a display name and a content fingerprint for `world:<corpus>`, a local file, or a hub dataset.

    `limit`: only the first rows (a hub dataset is then streamed, never downloaded whole)."""
    ref = as_ref(ref, DATA_REF, field)
    path = local_path(cfg, ref)
    if path is None:
        return _read_hub(ref.text, split, subset, field, limit)
    if not path.is_file():
        raise FlywheelError(f"{path}: data file not found; check the path")
    return _read_file(path)[:limit], str(path), file_fingerprint(path)


def _read_file(path: Path) -> list[dict[str, Any]]:
    rows = kind_of(path).rows(path)
    if not rows:
        raise FlywheelError(f"{path}: the file has no rows (it is empty); fill it or point the stage's data elsewhere")
    return rows


def _read_hub(ref: str, split: str, subset: str | None, field: str | None = None, limit: int | None = None
              ) -> tuple[list[dict[str, Any]], str, str]:
    import datasets

    check_hub_access(field, ref, "dataset")  # no network or no such id: one sentence at once, not after retries
    if limit is not None:
        rows = worded_hub_call(field, ref, lambda: list(datasets.load_dataset(ref, subset, split=split,
                                                                               streaming=True).take(limit)),
                               "dataset", f"check the id, the subset and the split ('{split}')")
        if not rows:
            raise FlywheelError(f"{ref}: split '{split}' has no rows; choose another split")
        return rows, ref, fingerprint(ref, subset, split, "first", limit)
    ds = worded_hub_call(field, ref, lambda: datasets.load_dataset(ref, subset, split=split), "dataset",
                         f"check the id, the subset and the split ('{split}')")
    if len(ds) == 0:
        raise FlywheelError(f"{ref}: split '{split}' has no rows; choose another split")
    return ds.to_list(), ref, fingerprint(ref, subset, split, ds._fingerprint)


def rename_columns(rows: list[dict[str, Any]], columns: dict[str, str], source: str, where: str
                   ) -> list[dict[str, Any]]:
    """Apply `stage.columns` (source name -> our name), naming any source column that does not exist."""
    found = list(rows[0])
    for src in columns:
        if src not in found:
            close = difflib.get_close_matches(src, found, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise FlywheelError(f"{where}.columns: '{src}' is not a column of {source} "
                                f"(found: {', '.join(found)}){hint}")
    if not columns:
        return rows
    return [{columns.get(k, k): v for k, v in row.items()} for row in rows]


def check_columns(rows: list[dict[str, Any]], needs: tuple[str, ...], source: str, where: str,
                  kind: str) -> None:
    """Every row has every needed column with a usable value; say which, where, and how to map them."""
    found = list(rows[0])
    missing = [c for c in needs if c not in found]
    if missing:
        wanted = ", ".join(needs) + (" (or messages)" if kind == "sft" and needs == ("prompt", "completion") else "")
        mapping = _suggest_mapping(missing, [c for c in found if c not in needs])
        if mapping:
            pairs = ", ".join(f"{ours}: {theirs}" for ours, theirs in mapping.items())
            fix = f"map yours with {where}.columns, e.g. {{{pairs}}}"
        else:
            fix = (f"add {' and '.join(missing)} to the data, or map a column of yours to "
                   f"{'it' if len(missing) == 1 else 'them'} with {where}.columns: {{<your column>: {missing[0]}}}")
        raise FlywheelError(
            f"{source}: {where} ({kind}) needs column(s) {wanted} but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (found: {', '.join(found)}); {fix}"
        )
    for n, row in enumerate(rows, 1):
        for col in needs:
            problem = _value_problem(col, row.get(col))
            if problem:
                raise FlywheelError(f"{source}: row {n}, column '{col}' {problem}; fix the data or the "
                                    f"{where}.columns mapping")


def _suggest_mapping(missing: list[str], spare: list[str]) -> dict[str, str]:
    """Source column -> needed column, only where a spare column is a usual or close name for it."""
    mapping: dict[str, str] = {}
    for col in missing:
        free = [c for c in spare if c not in mapping]
        guess = next((c for c in USUAL_NAMES.get(col, ()) if c in free), None)
        if guess is None:
            close = difflib.get_close_matches(col, free, n=1, cutoff=0.75)
            guess = close[0] if close else None
        if guess is not None:
            mapping[guess] = col
    return mapping


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _value_problem(col: str, value: Any) -> str | None:
    """What is wrong with one cell, or None."""
    if value is None or value == "" or value == []:
        return "is empty"
    if col == "messages":
        return None if _is_messages(value) else "must be a list of {role, content} messages"
    if col in ("prompt", *MESSAGE_COLUMNS):
        return None if isinstance(value, str) or _is_messages(value) else \
            f"must be text or a list of chat messages (got {type(value).__name__})"
    if col == "answer":
        ok = isinstance(value, str | int | float)
        return None if ok else f"must be a number or text (got {type(value).__name__})"
    if col == "tests":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))
        return None if ok else "must be test code or a list of assert statements"
    return None


def as_conversation(row: dict[str, Any], keep: tuple[str, ...] | None) -> dict[str, Any]:
    """Wrap text prompts/replies as user/assistant messages; keep only `keep` columns (all when None)."""
    out = {k: v for k, v in row.items() if keep is None or k in keep}
    if isinstance(out.get("prompt"), str):
        out["prompt"] = [{"role": "user", "content": out["prompt"]}]
    for col in MESSAGE_COLUMNS:
        if isinstance(out.get(col), str):
            out[col] = [{"role": "assistant", "content": out[col]}]
    if isinstance(out.get("answer"), int | float):  # one type per column, as Arrow needs
        out["answer"] = str(out["answer"])
    return out


def needed_columns(kind: str, rows: list[dict[str, Any]], rewards_need: tuple[str, ...] = (),
                   on_policy: bool = False) -> tuple[str, ...]:
    """The columns a stage reads: sft prompt+completion (or messages), dpo prompt+chosen+rejected (chosen+rejected
    when both are whole conversations that share their opening turns: TRL takes the prompt from them;
    prompt+answer when pairs are sampled on-policy), grpo prompt plus what its rewards read."""
    if kind == "sft":
        chat = "messages" in rows[0] and "completion" not in rows[0]
        return ("messages",) if chat else ("prompt", "completion")
    if kind == "dpo":
        if on_policy:
            return ("prompt", "answer")
        implicit = "prompt" not in rows[0] and _is_messages(rows[0].get("chosen"))  # the prompt inside the pairs
        return ("chosen", "rejected") if implicit else ("prompt", "chosen", "rejected")
    return ("prompt", *dict.fromkeys(rewards_need))


def load_stage_data(cfg: FlywheelConfig, ref: str, columns: dict[str, str], kind: str, where: str,
                    rewards_need: tuple[str, ...] = (), on_policy: bool = False, split: str = "train",
                    subset: str | None = None) -> StageData:
    """Read, rename, check and shape one stage's data; raises FlywheelError before any training."""
    rows, source, fp = read_source(cfg, ref, split, subset, field=f"{where}.data")
    rows = rename_columns(rows, columns, source, where)
    needs = needed_columns(kind, rows, rewards_need, on_policy)
    check_columns(rows, needs, source, where, kind)
    keep = None if kind == "grpo" or on_policy else needs  # grpo rewards receive every extra column
    return StageData([as_conversation(r, keep) for r in rows], source, fingerprint(fp, columns))

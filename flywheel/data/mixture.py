"""The mid-training mixture: read each source, take its weighted share of the token budget, pack once.

A packed corpus is cached under `home/cache/packed/<key>/` (input_ids.npy, doc_ids.npy,
meta.json), keyed by the tokenizer, the sources' fingerprints, the budget, seq_len and seed,
so reference scoring and every training run of a round read the very same tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flywheel.config import DataSource, FlywheelConfig
from flywheel.data.io import (
    atomic_dir,
    file_fingerprint,
    fingerprint,
    iter_jsonl,
    parquet_schema,
    read_json_rows,
    read_parquet_rows,
    write_json,
)
from flywheel.data.packing import Packed, pack, tokenize_documents
from flywheel.errors import FlywheelError

PACK_VERSION = 1


def _local_texts(path: Path, field: str, where: str = "text_field") -> list[str]:
    """A local file's documents; an empty file, a missing column or a bad line is one sentence naming the file."""
    if path.suffix == ".parquet":
        columns, n_rows = parquet_schema(path)
        if n_rows == 0:
            raise FlywheelError(f"{path}: is empty (no rows); the mid-training mixture needs documents, so fill "
                                "it or remove this source")
        if field not in columns:
            raise FlywheelError(f"{path}: has no column '{field}' (columns: {', '.join(columns)}); set {where} "
                                "to the column that holds the text")
        values = [row[field] for row in read_parquet_rows(path, [field])]
    else:
        rows = read_json_rows(path) if path.suffix == ".json" else (row for _, row in iter_jsonl(path))
        values, columns, n = [], {}, 0  # columns: every key seen, in order (a dict keeps order)
        for row in rows:
            n += 1
            columns.update(dict.fromkeys(row))
            values.append(row.get(field))
        if n == 0:
            raise FlywheelError(f"{path}: is empty (no rows); the mid-training mixture needs documents, so fill "
                                "it or remove this source")
        if field not in columns:
            raise FlywheelError(f"{path}: no row has a column '{field}' (columns: {', '.join(columns)}); set "
                                f"{where} to the column that holds the text")
    return [t for t in values if isinstance(t, str) and t]


def _hub_texts(src: DataSource, limit_chars: int) -> list[str]:
    """Stream a hub dataset until enough text for its share is read (the corpus is never fully downloaded)."""
    import datasets

    try:
        stream = iter(datasets.load_dataset(src.source, src.subset, split=src.split, streaming=True))
        texts, total = [], 0
        for row in stream:
            if src.text_field not in row:
                raise FlywheelError(
                    f"{src.source}: has no column '{src.text_field}' (columns: {', '.join(row)}); set text_field"
                )
            texts.append(row[src.text_field])
            total += len(texts[-1] or "")
            if total >= limit_chars:
                break
    except FlywheelError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, unknown split: all mean "cannot get it here"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlywheelError(f"{src.source}: could not load the hub dataset (split '{src.split}'): {first}; check "
                            "the id, or download it while online (HF_DATASETS_OFFLINE is set)") from None
    return texts


def source_texts(cfg: FlywheelConfig, src: DataSource, limit_chars: int) -> list[str]:
    """The documents of one source, from the tiny world, a local file or the hub."""
    index = next((i for i, s in enumerate(cfg.data.sources) if s is src), None)
    where = f"data.sources.{index}.text_field" if index is not None else "text_field"
    if src.source.startswith("world:"):
        from flywheel.world.build import resolve_world_ref

        return _local_texts(resolve_world_ref(cfg, src.source), src.text_field, where)
    if Path(src.source).expanduser().is_file():
        return _local_texts(Path(src.source).expanduser(), src.text_field, where)
    return _hub_texts(src, limit_chars)


def source_fingerprint(cfg: FlywheelConfig, src: DataSource) -> str:
    """Content hash for local/world files; id + split + subset for hub datasets (their revision pins the rest)."""
    if src.source.startswith("world:"):
        from flywheel.world.build import resolve_world_ref

        return file_fingerprint(resolve_world_ref(cfg, src.source))
    path = Path(src.source).expanduser()
    if path.is_file():
        return file_fingerprint(path)
    return fingerprint(src.source, src.subset, src.split)


@dataclass
class PackedCorpus:
    """A packed mid-training corpus on disk, memory-mapped for reading."""

    folder: Path
    key: str

    def load(self) -> Packed:
        return Packed(
            np.load(self.folder / "input_ids.npy", mmap_mode="r"),
            np.load(self.folder / "doc_ids.npy", mmap_mode="r"),
        )

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())


def mixture_key(cfg: FlywheelConfig, tokenizer_id: str) -> str:
    """Everything that decides which tokens the mixture holds."""
    sources = [(s.model_dump(mode="json"), source_fingerprint(cfg, s)) for s in cfg.data.sources]
    mt = cfg.midtrain
    return fingerprint(PACK_VERSION, tokenizer_id, sources, mt.token_budget, mt.seq_len, cfg.seed)


def build_mixture(cfg: FlywheelConfig, tok, tokenizer_id: str) -> PackedCorpus:
    """Tokenize and pack the weighted mixture once; reuse it when the key matches."""
    key = mixture_key(cfg, tokenizer_id)
    folder = cfg.home / "cache" / "packed" / key
    if (folder / "meta.json").exists():
        return PackedCorpus(folder, key)
    mt = cfg.midtrain
    total_w = sum(s.weight for s in cfg.data.sources)
    rng = random.Random(f"{cfg.seed}:mixture")
    docs: list[list[int]] = []
    shares = {}
    for src in cfg.data.sources:
        share = int(mt.token_budget * src.weight / total_w)
        texts = source_texts(cfg, src, limit_chars=share * 8)
        if not texts:
            raise FlywheelError(f"{src.source}: has no non-empty '{src.text_field}' documents; fill that column "
                                "or set text_field to the column that holds the text")
        order = list(range(len(texts)))
        rng.shuffle(order)
        got, taken, i = 0, [], 0
        ids = tokenize_documents([texts[j] for j in order], tok)
        while got < share:  # cycle (upsample) a source smaller than its share
            d = ids[i % len(ids)]
            taken.append(d)
            got += len(d)
            i += 1
        shares[src.source] = {"tokens": got, "documents": len(taken), "epochs": round(i / len(ids), 3)}
        docs.extend(taken)
    rng.shuffle(docs)
    packed = pack(docs, mt.seq_len)
    if len(packed) == 0:
        raise FlywheelError(
            f"data.sources: the mixture holds fewer than midtrain.seq_len={mt.seq_len} tokens; add data or shorten seq_len"
        )
    with atomic_dir(folder) as tmp:
        np.save(tmp / "input_ids.npy", packed.input_ids)
        np.save(tmp / "doc_ids.npy", packed.doc_ids)
        write_json(tmp / "meta.json", {"key": key, "rows": len(packed), "seq_len": mt.seq_len,
                                       "tokens": packed.n_tokens, "sources": shares})
    return PackedCorpus(folder, key)

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
from flywheel.data.io import atomic_dir, file_fingerprint, fingerprint, write_json
from flywheel.data.packing import Packed, pack, tokenize_documents
from flywheel.errors import FlywheelError

PACK_VERSION = 1


def _local_texts(path: Path, field: str) -> list[str]:
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parse errors in several types
        raise FlywheelError(f"{path}: could not be read as {kind} ({type(exc).__name__}); check the file") from None
    if len(ds) == 0:
        raise FlywheelError(f"{path}: is empty; the mid-training mixture needs documents")
    if field not in ds.column_names:
        raise FlywheelError(
            f"{path}: has no column '{field}' (columns: {', '.join(ds.column_names)}); set text_field for this source"
        )
    return [t for t in ds[field] if isinstance(t, str) and t]


def _hub_texts(src: DataSource, limit_chars: int) -> list[str]:
    """Stream a hub dataset until enough text for its share is read (the corpus is never fully downloaded)."""
    import datasets

    stream = datasets.load_dataset(src.source, src.subset, split=src.split, streaming=True)
    texts, total = [], 0
    for row in stream:
        if src.text_field not in row:
            raise FlywheelError(
                f"{src.source}: has no column '{src.text_field}' (columns: {', '.join(row)}); set text_field"
            )
        texts.append(row[src.text_field])
        total += len(texts[-1])
        if total >= limit_chars:
            break
    return texts


def source_texts(cfg: FlywheelConfig, src: DataSource, limit_chars: int) -> list[str]:
    """The documents of one source, from the tiny world, a local file or the hub."""
    if src.source.startswith("world:"):
        from flywheel.world.build import resolve_world_ref

        return _local_texts(resolve_world_ref(cfg, src.source), src.text_field)
    if Path(src.source).expanduser().is_file():
        return _local_texts(Path(src.source).expanduser(), src.text_field)
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
            raise FlywheelError(f"{src.source}: has no non-empty '{src.text_field}' documents")
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

"""Dolma-style compressed shards as mid-training sources, on a small stand-in in Dolmino's layout.

The stand-in (written once per module, well under 1 MB) has Dolmino's folders, `.json.zst` and `.json.gz`
shards (one zstd file with two frames, math as `.jsonl.gz`) and Dolma's document fields. The tests prove
that a weighted mixture of its subsets keeps its weights, that a store holds exactly the decompressed
texts, that a killed build resumes, and that bad files and patterns are one sentence each.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zstandard

from flywheel.config import validate_config
from flywheel.data.mixture import build_mixture
from flywheel.data.store import build_source
from flywheel.errors import FlywheelError

from .conftest import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = ("the model reads tokens from compressed shards while an anneal mixes maths prose code answers "
         "proofs questions wikipedia papers abstracts instructions 0 1 2 3 4 5 6 7 8 9 = + - ( ) ?").split()
# OLMo-2's 50B Dolmino mix, in billions of tokens: a subset's share of the mixture
WEIGHTS = {"dclm": 24.31, "flan": 8.54, "pes2o": 3.01, "wiki": 3.66, "stackexchange": 1.26, "math": 10.69}
FRAME_ONE_DOCS = 8  # documents in the first frame of the two-frame .zst file (the rest are in its second)
MULTI_FRAME = "data/dclm/0000/shard_00000001.json.zst"


@dataclass(frozen=True)
class Dolmino:
    root: Path
    documents: dict[str, int]  # subset -> documents in its files


def _documents(n: int, subset: str, seed: int, field: str = "text") -> list[dict]:
    """Dolma documents: id, text (a varied number of varied words), added, created, source, metadata."""
    rng = np.random.default_rng(seed)
    return [{"id": f"{subset}-{seed}-{i}", field: " ".join(rng.choice(VOCAB, size=int(rng.integers(4, 90)))),
             "added": "2024-11-20T00:00:00.000Z", "created": "2023-01-01T00:00:00.000Z", "source": subset,
             "metadata": {"length": i, "url": f"https://example.org/{subset}/{i}"}} for i in range(n)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write_zst(path: Path, frames: list[list[dict]]) -> None:
    """One zstd frame per list, concatenated (written with checksums, as the zstd tool does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    path.write_bytes(b"".join(compressor.compress(_jsonl(rows)) for rows in frames))


def _write_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(_jsonl(rows), mtime=0))


def _write_dolmino(root: Path) -> dict[str, int]:
    """dolmino/data/{dclm/0000,flan,math/tinyGSM-MIND,pes2o,stackexchange,wiki}; returns documents per subset."""
    counts = dict.fromkeys(WEIGHTS, 0)
    for i in range(4):
        docs = _documents(30, "dclm", i)
        frames = [docs[:FRAME_ONE_DOCS], docs[FRAME_ONE_DOCS:]] if i == 1 else [docs]
        _write_zst(root / f"data/dclm/0000/shard_{i:08d}.json.zst", frames)
        counts["dclm"] += len(docs)
    for seed, (subset, name) in enumerate([("flan", "flan/flan-{}.json.gz"), ("pes2o", "pes2o/pes2o-{}.json.gz"),
                                           ("stackexchange", "stackexchange/se-{}.json.gz"),
                                           ("wiki", "wiki/wiki-{}.json.gz"),
                                           ("math", "math/tinyGSM-MIND/part-{}.jsonl.gz")]):
        for part in range(2):
            docs = _documents(25, subset, 100 + 10 * seed + part)
            _write_gz(root / "data" / name.format(part), docs)
            counts[subset] += len(docs)
    return counts


@pytest.fixture(scope="module")
def dolmino(tmp_path_factory) -> Dolmino:
    root = tmp_path_factory.mktemp("stand-in") / "dolmino"
    counts = _write_dolmino(root)
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1 << 20  # small, so the tests are fast
    return Dolmino(root, counts)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _source(folder: Path, subset: str, **extra) -> dict:
    return {"source": str(folder), "include": [f"data/{subset}/*"], **extra}


def _cfg_dict(home: Path, sources: list[dict], budget: int = 4096, seq_len: int = 32) -> dict:
    return {"name": "t", "home": str(home), "data": {"sources": sources},
            "midtrain": {"token_budget": budget, "seq_len": seq_len, "batch_size": 4}}


def _cfg(home: Path, sources: list[dict], budget: int = 4096, seq_len: int = 32):
    return validate_config(_cfg_dict(home, sources, budget, seq_len))


def _decompressed_texts(path: Path) -> list[str]:
    """The texts of a shard, decompressed here by the libraries themselves (every frame / member)."""
    if path.name.endswith(".zst"):
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as r:
            data = r.read()
    else:
        data = gzip.decompress(path.read_bytes())
    return [json.loads(line)["text"] for line in data.splitlines() if line.strip()]


def _nothing_built(home: Path) -> bool:
    """No store folder and no .partial folder: home/cache/tokens absent or empty."""
    root = home / "cache" / "tokens"
    return not root.exists() or not any(root.iterdir())


# --- a mixture of Dolmino's subsets ---------------------------------------------------------------


def test_a_weighted_mixture_of_six_dolmino_subsets_realises_each_weight_within_one_window(dolmino, tmp_path, tok):
    sources = [_source(dolmino.root, subset, weight=weight) for subset, weight in WEIGHTS.items()]
    corpus = build_mixture(_cfg(tmp_path / "h", sources, budget=4096, seq_len=32), tok, "t", workers=1)
    meta, total = corpus.meta, sum(WEIGHTS.values())
    assert meta["rows"] == 4096 // 32
    assert len({s["store"] for s in meta["sources"]}) == 6  # each include chose its own files
    for s, (subset, weight) in zip(meta["sources"], WEIGHTS.items(), strict=True):
        assert s["documents"] == dolmino.documents[subset], subset
        assert abs(s["windows"] - weight / total * meta["rows"]) < 1, (subset, s["windows"])
    # the windows really taken from each store (by where they start) are the counts recorded
    bounds = np.cumsum([0] + [s["store_tokens"] for s in meta["sources"]])
    starts = np.load(corpus.folder / "windows.npy")
    realised = np.histogram(starts, bins=bounds)[0].tolist()
    assert realised == [s["windows"] for s in meta["sources"]] and sum(realised) == meta["rows"]


@pytest.mark.parametrize("subset", ["dclm", "math"])
def test_a_subsets_store_is_the_tokenized_decompressed_texts_in_file_order(dolmino, tmp_path, tok, subset):
    cfg = _cfg(tmp_path / "h", [_source(dolmino.root, subset)])
    store = build_source(cfg, cfg.data.sources[0], tok, workers=1).store
    files = sorted((dolmino.root / "data" / subset).rglob("*.json*"))
    texts = [t for path in files for t in _decompressed_texts(path)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert len({len(d) for d in ids}) > 10  # documents of many lengths, not one repeated size
    expected = [t for d in ids for t in (*d, tok.eos_token_id)]
    got = np.concatenate([np.asarray(store.tokens(i)) for i in range(len(store.shards))]).tolist()
    assert got == expected
    assert store.meta["documents"] == len(texts) == dolmino.documents[subset]
    assert len(store.shards) == len(files)  # one piece (and shard) per compressed file


def test_a_compressed_file_above_the_stripe_size_is_cut_by_document_count_and_loses_nothing(dolmino, tmp_path, tok,
                                                                                            monkeypatch):
    from flywheel.data import compressed

    monkeypatch.setattr(compressed, "STRIPE_BYTES", 1500)  # each few-KB dclm shard becomes several pieces
    cfg = _cfg(tmp_path / "h", [_source(dolmino.root, "dclm")])
    store = build_source(cfg, cfg.data.sources[0], tok, workers=2).store
    files = sorted((dolmino.root / "data/dclm").rglob("*.json.zst"))
    assert len(store.shards) == sum(-(-f.stat().st_size // 1500) for f in files) > len(files)
    texts = [t for path in files for t in _decompressed_texts(path)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    got = []  # every document of every stripe, split at its EOS
    for i in range(len(store.shards)):
        tokens, ends = np.asarray(store.tokens(i)).tolist(), [0, *np.asarray(store.doc_ends(i)).tolist()]
        got += [tuple(tokens[a:b - 1]) for a, b in zip(ends[:-1], ends[1:], strict=True)]
    assert sorted(got) == sorted(tuple(d) for d in ids)  # each document once, in some stripe


KILLED_BUILD = """
import sys
sys.path.insert(0, {repo!r})
from flywheel.config import validate_config
from flywheel.data import store
from tests.conftest import byte_tokenizer
cfg = validate_config({cfg!r})
store.build_source(cfg, cfg.data.sources[0], byte_tokenizer(), workers=1)
"""


def test_a_build_killed_after_two_compressed_files_resumes_with_them_and_ends_like_a_clean_build(dolmino, tmp_path,
                                                                                              tok):
    sources = [_source(dolmino.root, "dclm")]  # four .json.zst files: four pieces
    script = KILLED_BUILD.format(repo=str(REPO), cfg=_cfg_dict(tmp_path / "h", sources))
    env = {**os.environ, "FLYWHEEL_FAILPOINT": "token-shard:2"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, start_new_session=True, timeout=120)
    assert killed.returncode == -9
    (partial,) = (tmp_path / "h" / "cache" / "tokens").glob("*.partial")
    assert sorted(p.name for p in partial.glob("*.ds")) == ["00000.ds", "00001.ds"]
    assert not partial.with_suffix("").exists()  # nothing looks complete

    cfg = _cfg(tmp_path / "h", sources)
    resumed = build_source(cfg, cfg.data.sources[0], tok, workers=1).store
    clean_cfg = _cfg(tmp_path / "clean", sources)
    clean = build_source(clean_cfg, clean_cfg.data.sources[0], tok, workers=1).store
    assert resumed.key == clean.key and not partial.exists() and len(clean.shards) == 4
    for s in clean.shards:
        for name in (s["file"], s["file"] + ".index"):
            assert (resumed.folder / name).read_bytes() == (clean.folder / name).read_bytes(), name
    assert "Skipping 1 already completed tasks" in (resumed.folder / "datatrove.log").read_text()


# --- broken files and patterns: one sentence each, nothing left half-built ------------------------


def _lines_reached(message: str, path: Path, compression: str, kind: str) -> int:
    """N from '<path>: the <compression> stream is <kind> after N lines (...)', asserting that form."""
    assert "\n" not in message
    found = re.match(rf"{re.escape(str(path))}: the {re.escape(compression)} stream is {kind} after ([\d,]+) lines "
                     r"\(.*\); download the file again or remove it$", message)
    assert found, message
    return int(found[1].replace(",", ""))


def test_a_corrupt_zst_fails_the_build_naming_the_file_and_how_far_it_got_and_leaves_nothing(dolmino, tmp_path,
                                                                                           tok):
    shutil.copytree(dolmino.root / "data/dclm", tmp_path / "bad/data/dclm")
    bad = tmp_path / "bad" / MULTI_FRAME
    data = bytearray(bad.read_bytes())
    middle = len(data) // 2  # inside the second frame: the first frame's documents come out before it breaks
    data[middle:middle + 64] = bytes(range(64))
    bad.write_bytes(bytes(data))
    cfg = _cfg(tmp_path / "h", [_source(tmp_path / "bad", "dclm")])
    with pytest.raises(FlywheelError) as failure:
        build_source(cfg, cfg.data.sources[0], tok, workers=2)
    lines = _lines_reached(str(failure.value), bad, ".zst", "corrupt")
    assert FRAME_ONE_DOCS <= lines < 30
    assert _nothing_built(cfg.home)


def test_a_truncated_gz_fails_the_build_naming_the_file_and_how_far_it_got_and_leaves_nothing(dolmino, tmp_path,
                                                                                            tok):
    shutil.copytree(dolmino.root / "data/flan", tmp_path / "bad/data/flan")
    bad = tmp_path / "bad/data/flan/flan-1.json.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    cfg = _cfg(tmp_path / "h", [_source(tmp_path / "bad", "flan")])
    with pytest.raises(FlywheelError) as failure:
        build_source(cfg, cfg.data.sources[0], tok, workers=1)
    lines = _lines_reached(str(failure.value), bad, ".gz", "truncated")
    assert 0 < lines < 25  # part of the file was read, not all of it
    assert _nothing_built(cfg.home)


def test_an_unknown_compression_inside_a_folder_source_is_one_sentence_naming_the_file(dolmino, tmp_path, tok):
    shutil.copytree(dolmino.root / "data/wiki", tmp_path / "lz4/data/wiki")
    (tmp_path / "lz4/data/wiki/x.json.lz4").write_bytes(b"\x04\x22\x4d\x18 not read")
    cfg = _cfg(tmp_path / "h", [_source(tmp_path / "lz4", "wiki")])
    with pytest.raises(FlywheelError) as failure:
        build_source(cfg, cfg.data.sources[0], tok, workers=1)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'lz4/data/wiki/x.json.lz4'}: '.lz4' is not a compression this reader "
                              "knows; use one of .gz/.zst/.bz2/.xz"), message
    assert _nothing_built(cfg.home)


def test_an_include_that_matches_no_file_is_one_sentence_naming_the_patterns(dolmino, tmp_path, tok):
    cfg = _cfg(tmp_path / "h", [_source(dolmino.root, "c4")])
    with pytest.raises(FlywheelError) as failure:
        build_source(cfg, cfg.data.sources[0], tok, workers=1)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"data.sources.0.include: no file under {dolmino.root} matches include "
                              "['data/c4/*']"), message
    assert _nothing_built(cfg.home)


def test_prepare_data_on_a_subset_without_the_text_field_exits_2_with_one_line_naming_file_and_field(tmp_path, tok):
    bad = tmp_path / "notext/data/flan/flan-0.json.gz"
    _write_gz(bad, _documents(10, "flan", 7, field="content"))  # Dolma's fields, but the text under `content`
    tok.save_pretrained(tmp_path / "tokenizer")
    doc = _cfg_dict(tmp_path / "h", [_source(tmp_path / "notext", "flan")])
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**doc, "model": {"tokenizer": str(tmp_path / "tokenizer")}}))
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "prepare-data", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {bad}: has no column 'text' in its first row (columns: id, content, added, created, source, "
        "metadata); set data.sources.0.text_field to the column that holds the text"], out.stderr
    assert _nothing_built(tmp_path / "h")

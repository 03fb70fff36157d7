"""The token store and the window index: what is on disk, how a kill is survived, what a mixture holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.config import validate_config
from flywheel.data import store as store_mod
from flywheel.data.io import write_jsonl
from flywheel.data.mixture import build_mixture, window_counts
from flywheel.data.store import build_source, open_store, store_key
from flywheel.errors import FlywheelError

from .conftest import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over the lazy dog".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) + f" {i}" for i in range(n)]


def _cfg(home: Path, sources: list[dict], budget: int = 4096, seq_len: int = 32, **data):
    return validate_config({"name": "t", "home": str(home), "data": {"sources": sources, **data},
                            "midtrain": {"token_budget": budget, "seq_len": seq_len, "batch_size": 4}})


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _expected_stream(docs: list[str], tok) -> tuple[list[int], list[int]]:
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    flat = [t for d in ids for t in [*d, tok.eos_token_id]]
    return flat, list(np.cumsum([len(d) + 1 for d in ids]))


def test_a_store_holds_every_document_with_eos_as_uint16_and_its_ends_as_offsets(tmp_path, tok):
    docs = _docs(300)
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": t} for t in docs[:200]])
    pq.write_table(pa.table({"text": docs[200:]}), tmp_path / "data" / "b.parquet")
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "data")}])
    rep = build_source(cfg, cfg.data.sources[0], tok, workers=1)
    st = rep.store
    assert not rep.reused and st.dtype == np.dtype("<u2") and len(st.shards) == 2
    got = [np.asarray(st.tokens(i)).tolist() for i in range(2)]
    ends = [np.asarray(st.doc_ends(i)).tolist() for i in range(2)]
    for shard, part in ((0, docs[:200]), (1, docs[200:])):  # the folder's files in sorted order
        flat, doc_ends = _expected_stream(part, tok)
        assert got[shard] == flat and ends[shard] == doc_ends
    meta = json.loads((st.folder / "store.json").read_text())
    assert meta["documents"] == 300 and meta["tokens"] == sum(len(g) for g in got)
    assert meta["bytes"] == 2 * meta["tokens"] + 8 * meta["documents"]  # 2 bytes a token, 8 a document
    assert not st.folder.with_name(st.folder.name + ".partial").exists()
    assert build_source(cfg, cfg.data.sources[0], tok, workers=1).reused


def test_two_workers_over_many_pieces_write_the_store_one_worker_writes(tmp_path, tok, monkeypatch):
    docs = _docs(3000)
    write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in docs])
    monkeypatch.setattr(store_mod, "PIECE_BYTES", 20_000)  # ~6 pieces, so tasks really run on two processes
    stores = {}
    for workers in (1, 2):
        cfg = _cfg(tmp_path / f"h{workers}", [{"source": str(tmp_path / "big.jsonl")}])
        stores[workers] = build_source(cfg, cfg.data.sources[0], tok, workers=workers).store
    assert len(stores[1].shards) >= 5
    for i in range(len(stores[1].shards)):
        assert (stores[1].folder / f"{i:05d}.ds").read_bytes() == (stores[2].folder / f"{i:05d}.ds").read_bytes()
    flat, _ = _expected_stream(docs, tok)  # pieces cut at line boundaries: no document lost or doubled
    assert np.concatenate([np.asarray(stores[2].tokens(i)) for i in range(len(stores[2].shards))]).tolist() == flat


BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from flywheel.config import validate_config
from flywheel.data import store
from tests.conftest import byte_tokenizer
store.PIECE_BYTES = 20_000
cfg = validate_config({{"name": "t", "home": {home!r}, "data": {{"sources": [{{"source": {src!r}}}]}}}})
store.build_source(cfg, cfg.data.sources[0], byte_tokenizer(), workers=1)
"""


def test_a_build_killed_after_two_shards_resumes_with_them_and_ends_like_a_clean_build(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in _docs(3000)])
    script = BUILD.format(repo=str(REPO), home=str(tmp_path / "h"), src=str(tmp_path / "big.jsonl"))
    env = {**os.environ, "FLYWHEEL_FAILPOINT": "token-shard:2"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, start_new_session=True, timeout=120)
    assert killed.returncode == -9
    (partial,) = (tmp_path / "h" / "cache" / "tokens").glob("*.partial")
    assert sorted(p.name for p in partial.glob("*.ds")) == ["00000.ds", "00001.ds"]
    assert not partial.with_suffix("").exists()  # nothing looks complete

    monkeypatch.setattr(store_mod, "PIECE_BYTES", 20_000)
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "big.jsonl")}])
    resumed = build_source(cfg, cfg.data.sources[0], tok, workers=1).store
    clean_cfg = _cfg(tmp_path / "clean", [{"source": str(tmp_path / "big.jsonl")}])
    clean = build_source(clean_cfg, clean_cfg.data.sources[0], tok, workers=1).store
    assert resumed.key == clean.key and not partial.exists()
    for s in clean.shards:
        assert (resumed.folder / s["file"]).read_bytes() == (clean.folder / s["file"]).read_bytes()
    assert "Skipping 1 already completed tasks" in (resumed.folder / "datatrove.log").read_text()


def test_a_weighted_mixture_fills_the_budget_in_whole_windows_within_one_window_of_each_weight(tmp_path, tok):
    write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in _docs(2000, seed=1)])
    write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in _docs(40, seed=2)])
    budget, seq_len = 20_000, 32
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "big.jsonl"), "weight": 3.0},
                                {"source": str(tmp_path / "small.jsonl"), "weight": 1.0}], budget, seq_len)
    corpus = build_mixture(cfg, tok, "t")
    meta, windows = corpus.meta, corpus.load()
    assert len(windows) == budget // seq_len and windows.n_tokens <= budget  # never past the budget
    per_source = [s["windows"] for s in meta["sources"]]
    exact = [len(windows) * 3 / 4, len(windows) / 4]
    assert sum(per_source) == len(windows) and all(abs(n - e) < 1 for n, e in zip(per_source, exact, strict=True))
    small = meta["sources"][1]
    assert small["epochs"] > 1 and small["epochs"] == pytest.approx(small["windows"] * seq_len / small["store_tokens"],
                                                                      rel=0.1)
    # which source each window came from, by where it starts: the realised shares are the recorded ones
    big_tokens = meta["sources"][0]["store_tokens"]
    starts = np.asarray(np.load(corpus.folder / "windows.npy"))
    assert int((starts < big_tokens).sum()) == per_source[0]
    assert not np.all(np.diff(starts[: per_source[0]]) > 0)  # shuffled, not in file order
    assert window_counts(10, [1, 1, 1]) == [4, 3, 3] and window_counts(7, [2, 1]) == [5, 2]


def test_window_document_ids_change_exactly_after_each_eos(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _docs(400)])
    corpus = build_mixture(_cfg(tmp_path / "h", [{"source": str(tmp_path / "a.jsonl")}], 8192, 64), tok, "t")
    windows = corpus.load()
    for r in range(0, len(windows), 7):
        ids, docs = windows.input_ids[r], windows.doc_ids[r]
        changes = np.flatnonzero(np.diff(docs)) + 1  # first token of a new document
        assert np.all(ids[changes - 1] == tok.eos_token_id)
        assert np.all(np.diff(docs) >= 0) and (ids[:-1] == tok.eos_token_id).sum() == len(changes)
    assert np.asarray(windows.input_ids).shape == (len(windows), 64)


def test_a_store_built_with_another_tokenizer_is_refused_by_key(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _docs(50)])
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "a.jsonl")}])
    st = build_source(cfg, cfg.data.sources[0], tok, workers=1).store
    other = byte_tokenizer()
    other.add_tokens(["fox jumps"])
    other_key = store_key(cfg, cfg.data.sources[0], other, None)
    assert other_key != st.key
    with pytest.raises(FlywheelError, match=r"was built for key .* \(another tokenizer or other data\); delete"):
        open_store(st.folder, other_key)


def _nothing_built(home: Path) -> bool:
    root = home / "cache" / "tokens"
    return not root.exists() or not any(root.iterdir())


def test_an_unparsable_line_deep_in_a_file_names_the_file_and_line_and_leaves_no_store(tmp_path, tok, monkeypatch):
    rows = [json.dumps({"text": t}) for t in _docs(2000)]
    rows[1500] = '{"text": "cut off'
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(store_mod, "PIECE_BYTES", 20_000)  # the bad line is in a later piece, not the first
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "bad.jsonl")}])
    with pytest.raises(FlywheelError, match=r"bad\.jsonl: line 1501, column \d+ is not valid JSON"):
        build_source(cfg, cfg.data.sources[0], tok, workers=2)
    assert _nothing_built(cfg.home)


def test_a_tokenizer_without_eos_and_an_all_empty_source_are_one_sentence_each(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "a.jsonl")}])
    with pytest.raises(FlywheelError, match=r"the tokenizer has no eos token; the store needs one"):
        build_source(cfg, cfg.data.sources[0], byte_tokenizer(eos=False))
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    cfg = _cfg(tmp_path / "h", [{"source": str(tmp_path / "blank.jsonl")}])
    with pytest.raises(FlywheelError, match=r"has no non-empty 'text' documents"):
        build_source(cfg, cfg.data.sources[0], tok, workers=1)
    assert _nothing_built(cfg.home)


def test_a_glob_that_matches_nothing_is_refused_by_the_config(tmp_path):
    with pytest.raises(Exception, match=r"data\.sources\.0\.source.*the glob matches no file; fix the pattern"):
        _cfg(tmp_path / "h", [{"source": str(tmp_path / "shards" / "*.jsonl")}])


def test_consecutive_slices_read_on_where_the_last_stopped_and_wrap_into_a_recorded_epoch(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _docs(300, seed=3)])
    src = [{"source": str(tmp_path / "a.jsonl")}]
    budget, seq_len = 2048, 32  # 64 windows a slice
    home = tmp_path / "h"

    def starts(part: int, budget: int = budget) -> tuple[set[int], dict]:
        corpus = build_mixture(_cfg(home, src, budget, seq_len, slice=part), tok, "t")
        return set(np.load(corpus.folder / "windows.npy").tolist()), corpus.meta

    s0, m0 = starts(0)
    s1, m1 = starts(1)
    assert len(s0) == len(s1) == budget // seq_len and not s0 & s1  # fresh windows, none repeated
    assert m0["key"] != m1["key"] and (m0["slice"], m1["slice"]) == (0, 1)
    # one stream: slices 0 and 1 are exactly the first two budgets' worth, what one anneal of twice the budget reads
    both, _ = starts(0, 2 * budget)
    assert s0 | s1 == both
    # slice 0 is the mixture a plain anneal (no slice) always read: its key does not name a slice
    plain = build_mixture(_cfg(home, src, budget, seq_len), tok, "t")
    assert plain.key == m0["key"]
    (src0,), (src1,) = m0["sources"], m1["sources"]
    assert src0["epoch_from"] == 0 and src1["epoch_from"] == pytest.approx(src0["epoch_to"])
    per_epoch = 1 / src0["epoch_to"]  # slices per epoch of this store
    # a slice past the end of the store reads a new epoch, and says where it is
    late = int(np.ceil(per_epoch)) + 1
    s_late, m_late = starts(late)
    assert m_late["sources"][0]["epoch_from"] > 1 and len(s_late) == budget // seq_len

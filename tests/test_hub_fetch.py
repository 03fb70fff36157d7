"""A hub source above data.fetch_above_tokens: planned, fetched in parallel into the Hugging Face cache, checked
against the hub's hashes, tokenized as local files; the commit in the store key and on the run.

The hub is tests/hub_standin.py on 127.0.0.1 serving a Dolmino-layout folder; the real huggingface_hub client
talks to it (its module constants pointed there for the test: the suite runs with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flywheel.config import validate_config
from flywheel.data.fetch import FETCH_MARGIN, plan_fetch
from flywheel.data.mixture import build_mixture, source_plans
from flywheel.data.store import store_key
from flywheel.errors import FlywheelError
from flywheel.round.records import slice_tags

from .conftest import byte_tokenizer
from .hub_standin import DEFAULT_COMMIT, HubStandin
from .test_dolma_sources import _documents, _write_gz, _write_zst

REPO_ID = "testorg/dolmino-mini"
MATH_FILES = 8


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory) -> Path:
    """A repo in Dolmino's layout: eight .json.zst math shards, two .json.gz wiki shards, a README."""
    root = tmp_path_factory.mktemp("hubrepo")
    for i in range(MATH_FILES):
        _write_zst(root / f"data/math/part-{i // 4}/math-{i:04d}.json.zst", [_documents(40, "math", i)])
    for i in range(2):
        _write_gz(root / f"data/wiki/wiki-{i:04d}.json.gz", _documents(40, "wiki", 100 + i))
    (root / "README.md").write_text("# a stand-in\n")
    return root


@pytest.fixture
def hub(repo_folder, tmp_path, monkeypatch):
    """The stand-in, and the client pointed at it with a fresh cache (the suite is otherwise offline)."""
    from huggingface_hub import constants

    with HubStandin({REPO_ID: repo_folder}, delay=0.2) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)  # what HF_ENDPOINT sets at import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
        yield standin


def _cfg(home: Path, budget: int = 30_000, **source):
    src = {"source": REPO_ID, "include": ["data/math/*"], **source}
    return validate_config({"name": "f", "home": str(home), "data": {"sources": [src], "fetch_above_tokens": 0,
                                                                     "fetch_workers": 4},
                            "midtrain": {"token_budget": budget, "seq_len": 32, "batch_size": 4}})


def _tok_id(tok) -> str:
    from flywheel.models import tokenizer_identity

    return tokenizer_identity(tok)


def test_a_fetched_source_takes_only_the_files_its_share_needs_in_parallel_and_tokenizes_them_all(hub, tmp_path):
    tok = byte_tokenizer()
    cfg = _cfg(tmp_path / "home")
    corpus = build_mixture(cfg, tok, _tok_id(tok), workers=2)
    plan = source_plans(cfg, tok, _tok_id(tok))[2][0]
    fetched = {f.path for f in plan.files}
    assert plan.commit == DEFAULT_COMMIT and plan.subset_files == MATH_FILES
    # fails if the share took one file or the whole subset, or if a file outside the subset was planned
    assert len(fetched) > 1, f"the share needs more than one file, planned {sorted(fetched)}"
    assert len(fetched) < MATH_FILES, f"the share took the whole subset ({len(fetched)} of {MATH_FILES} files)"
    outside = [p for p in fetched if not p.startswith("data/math/")]
    assert not outside, f"planned files outside the include: {outside}"
    largest = max(f.size for f in plan.files) * plan.tokens_per_byte
    assert plan.share_tokens * (1 + FETCH_MARGIN) <= plan.est_tokens < plan.share_tokens * (1 + FETCH_MARGIN) + largest
    assert set(hub.served) == fetched  # the wiki subset and the other math files were never downloaded
    assert sum(hub.served.values()) == len(fetched) + 1  # each once, plus the ranged sample read of one of them
    assert hub.peak >= 2  # downloads overlapped: fetched in parallel
    meta = json.loads((corpus.folder / "meta.json").read_text())
    store = Path(corpus.folder, meta["shards"][0]["path"]).parent
    assert len(meta["shards"]) == len(fetched)  # one piece per fetched file, tokenized by the workers
    assert json.loads((store / "store.json").read_text())["revision"] == DEFAULT_COMMIT
    assert meta["sources"][0]["revision"] == DEFAULT_COMMIT


def test_a_second_run_fetches_nothing_and_a_pinned_commit_asks_the_hub_nothing(hub, tmp_path, repo_folder):
    tok = byte_tokenizer()
    cfg = _cfg(tmp_path / "home")
    first = build_mixture(cfg, tok, _tok_id(tok), workers=2)
    served, calls = sum(hub.served.values()), len(hub.calls)
    for folder in (cfg.home / "cache" / "tokens", cfg.home / "cache" / "packed"):  # rebuild the store from the cache
        for child in folder.iterdir():
            import shutil

            shutil.rmtree(child)
    again = build_mixture(cfg, tok, _tok_id(tok), workers=2)
    assert sum(hub.served.values()) == served and again.key == first.key
    assert np.array_equal(np.load(first.folder / "windows.npy"), np.load(again.folder / "windows.npy"))
    assert len(hub.calls) == calls  # the plan is kept; the files of a commit are in the cache: no request at all


def test_the_commit_is_in_the_store_key_and_on_the_runs_tags(hub, tmp_path):
    tok = byte_tokenizer()
    cfg = _cfg(tmp_path / "home")
    corpus = build_mixture(cfg, tok, _tok_id(tok), workers=1)
    plan = source_plans(cfg, tok, _tok_id(tok))[2][0]
    other = type(plan)(**{**plan.__dict__, "commit": "f" * 40})
    src = cfg.data.sources[0]
    assert store_key(cfg, src, tok, None, plan) != store_key(cfg, src, tok, None, other)
    tags = slice_tags(cfg, corpus.key)
    assert f"{REPO_ID}@{DEFAULT_COMMIT}" in tags["flywheel.data_revisions"]


def test_a_fetched_file_whose_bytes_differ_from_the_hubs_hash_is_one_sentence(hub, tmp_path):
    from flywheel.data.fetch import fetch_files

    tok = byte_tokenizer()
    cfg = _cfg(tmp_path / "home")
    plan = plan_fetch(cfg, 0, tok, _tok_id(tok), 30_000)
    local = fetch_files(cfg, 0, plan)
    blob = local[0].resolve()
    data = bytearray(blob.read_bytes())
    data[-8:] = b"\0" * 8  # same size, other bytes: only a hash can tell
    blob.write_bytes(bytes(data))
    with pytest.raises(FlywheelError, match=rf"^{REPO_ID}/{plan.files[0].path}: the fetched bytes hash to \w+, not "
                                            r"the hub's \w+; delete it from the Hugging Face cache"):
        fetch_files(cfg, 0, plan)


def test_an_include_that_matches_nothing_on_the_hub_and_an_unknown_revision_are_one_sentence(hub, tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(FlywheelError, match=r"^data\.sources\.0\.source: no data file of testorg/dolmino-mini at "
                                            r"5eedc0ffee5e matches include \['data/code/\*'\]"):
        plan_fetch(_cfg(tmp_path / "a", include=["data/code/*"]), 0, tok, _tok_id(tok), 30_000)
    with pytest.raises(FlywheelError, match=r"^data\.sources\.0\.source: .*testorg/dolmino-mini"):
        plan_fetch(_cfg(tmp_path / "b", revision="v9"), 0, tok, _tok_id(tok), 30_000)


def test_a_small_share_is_still_streamed_not_fetched(tmp_path):
    cfg = validate_config({"name": "s", "home": str(tmp_path), "data": {"sources": [{"source": REPO_ID}]},
                           "midtrain": {"token_budget": 6000, "seq_len": 32, "batch_size": 4}})
    from flywheel.data.fetch import fetches

    assert not fetches(cfg, cfg.data.sources[0], 6000)  # under the default 50M tokens
    assert fetches(cfg, cfg.data.sources[0], 60_000_000)

"""References are parsed once (flywheel/refs.py) and data-source kinds sit in one table (flywheel/data/kinds.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.config import DataSource, validate_config
from flywheel.data.kinds import DATA_FILE_SUFFIXES, KINDS, kind_of, piece_texts
from flywheel.errors import ConfigError, FlywheelError
from flywheel.refs import (
    CORPUS_REF,
    DATA_REF,
    MODEL_REF,
    Ref,
    data_files,
    local_path,
    model_location,
    parse_ref,
    resolve_world_ref,
)


@pytest.fixture()
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a model folder and data files of every kind, as the working directory."""
    (tmp_path / "model").mkdir()
    (tmp_path / "shards" / "more").mkdir(parents=True)
    for name in ("a.jsonl", "shards/b.jsonl", "shards/more/c.json", "notes.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_kind_of_reference_parses_to_its_parts(files: Path):
    assert parse_ref("world:micro") == Ref("world:micro", "world", world="micro")
    assert parse_ref(" world:sft ", allowed=DATA_REF) == Ref("world:sft", "world", world="sft")
    assert parse_ref("./model").kind == "folder" and parse_ref("./model").path == Path("model")
    assert parse_ref("org/name") == Ref("org/name", "hub", hub_id="org/name")
    assert parse_ref("a.jsonl", allowed=DATA_REF).kind == "file"
    assert parse_ref("shards", allowed=CORPUS_REF).kind == "folder"
    assert parse_ref("shards/*.jsonl", allowed=CORPUS_REF).kind == "glob"
    assert parse_ref("models:/fw-rl@reference", strict=False) == Ref(
        "models:/fw-rl@reference", "registry", registry_name="fw-rl", alias="reference")
    assert parse_ref("models:/fw-rl/3", strict=False) == Ref("models:/fw-rl/3", "registry", registry_name="fw-rl",
                                                             version=3)
    assert parse_ref("org/name", field="model.source").field == "model.source"  # kept, not compared


@pytest.mark.parametrize(("section", "error"), [
    ({"model": {"source": "world:huge"}}, "model.source: unknown tiny-world size 'huge'; use one of nano, micro, mini"),
    ({"model": {"source": "./nowhere"}}, "model.source: local model folder does not exist; build it or fix the path"),
    ({"model": {"source": "models:/fw-rl@reference"}},
     "model.source: must be world:<size>, an existing local folder, or a hub id like 'org/name'"),
    ({"data": {"sources": [{"source": "world:nope"}]}}, "data.sources.0.source: unknown tiny-world corpus 'nope'"),
    ({"data": {"sources": [{"source": "none/*.jsonl"}]}}, "the glob matches no file; fix the pattern"),
    ({"data": {"sources": [{"source": "notes.txt"}]}}, "local data must be a .jsonl/.json/.parquet file"),
    ({"posttrain": {"stages": [{"kind": "sft", "data": "shards"}]}},
     "posttrain.stages.0.data: local data file does not exist; fix the path"),
    ({"posttrain": {"stages": [{"kind": "sft", "data": "bad id!"}]}},
     "must be world:<corpus>, a local .jsonl/.json/.parquet file (.jsonl/.json may add .gz/.zst/.bz2/.xz), or a hub dataset id"),
])
def test_the_config_refuses_a_reference_with_the_sentence_parse_ref_gives(files: Path, section: dict, error: str):
    with pytest.raises(ConfigError) as caught:
        validate_config({"name": "r", "home": str(files / "home"), **section})
    assert any(error in problem for problem in caught.value.problems), caught.value.problems


def test_config_values_are_stripped_and_carry_their_ref(files: Path):
    cfg = validate_config({"name": "r", "home": str(files / "home"), "model": {"source": " ./model "},
                           "data": {"sources": [{"source": "shards"}, {"source": "org/corpus"}]}})
    assert cfg.model.source == "./model" and cfg.model.ref.kind == "folder"
    assert [s.ref.kind for s in cfg.data.sources] == ["folder", "hub"]
    assert [s.ref.kind for s in cfg.posttrain.stages] == ["world", "world"]  # the default stages read the world
    assert cfg.uses_world() and not validate_config({"name": "r", "model": {"source": "org/m"}, "data": {
        "sources": [{"source": "a.jsonl"}]}, "posttrain": {"stages": [{"kind": "sft", "data": "a.jsonl"}]}}).uses_world()


def test_resolution_gives_each_stage_what_it_reads(files: Path):
    cfg = validate_config({"name": "r", "home": str(files / "home")})
    assert model_location(cfg, "org/name") == "org/name"
    assert model_location(cfg, "./model") == str((files / "model").resolve())
    assert local_path(cfg, parse_ref("org/name")) is None
    assert data_files(cfg, "org/corpus") is None
    assert data_files(cfg, "a.jsonl") == [Path("a.jsonl")]
    assert data_files(cfg, "shards") == [Path("shards/b.jsonl"), Path("shards/more/c.json")]  # sorted, recursive
    assert data_files(cfg, "shards/**/*.json*") == [Path("shards/b.jsonl"), Path("shards/more/c.json")]
    with pytest.raises(FlywheelError, match=r"^data\.sources\.0\.source: the glob \* matches notes\.txt, which is not"):
        data_files(cfg, parse_ref("*", "data.sources.0.source", CORPUS_REF, strict=False))
    with pytest.raises(FlywheelError, match=r"^model\.source: models:/m@champion: a model-registry reference is not "
                                            r"read here; download"):
        model_location(cfg, parse_ref("models:/m@champion", "model.source", strict=False))


def test_a_world_reference_before_the_world_is_built_says_to_build_it(files: Path):
    cfg = validate_config({"name": "r", "home": str(files / "home")})
    for ref in ("world:nano", "world:midtrain"):
        with pytest.raises(FlywheelError, match=rf"^{ref}: the tiny world is not built at .*; run `flywheel world "
                                                r"build CONFIG` first"):
            model_location(cfg, ref) if ref == "world:nano" else data_files(cfg, ref)
    with pytest.raises(FlywheelError, match="not built"):
        resolve_world_ref(cfg, parse_ref("world:sft", allowed=DATA_REF))


def test_the_file_suffixes_the_config_takes_are_the_kinds_table(files: Path):
    compressed = tuple(f".{base}{c}" for base in ("jsonl", "json") for c in (".gz", ".zst", ".bz2", ".xz"))
    assert DATA_FILE_SUFFIXES == tuple(k.suffix for k in KINDS.values() if k.suffix) == (
        ".jsonl", ".json", ".parquet", *compressed)
    assert MODEL_REF.kinds == ("world", "folder", "hub") and "glob" in CORPUS_REF.kinds
    assert kind_of("x/y.parquet").name == "parquet" and kind_of("y.jsonl").name == "jsonl"
    assert kind_of("dclm-0000.json.zst").name == "json.zst" and kind_of("a.jsonl.gz").name == "jsonl.gz"
    with pytest.raises(FlywheelError, match=r"x\.json\.lz4: '\.lz4' is not a compression this reader knows"):
        kind_of("x.json.lz4")
    with pytest.raises(FlywheelError, match=r"notes\.txt: is not a \.jsonl/\.json/\.parquet file"):
        kind_of("notes.txt")


def test_every_file_kind_reads_the_same_texts_through_its_entry(tmp_path: Path):
    texts = [f"document {i}" for i in range(25)]
    rows = [{"text": t, "n": i} for i, t in enumerate(texts)] + [{"text": "", "n": -1}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=4)
    src = DataSource(source=str(tmp_path / "d.jsonl"))
    for name in ("d.jsonl", "d.json", "d.parquet"):
        path = tmp_path / name
        kind = kind_of(path)
        pieces = kind.pieces(str(path), 100)  # small pieces: jsonl and parquet are cut into several
        assert [t for p in pieces for t in piece_texts(src, p)] == texts, name
        assert kind.columns(path)[0] == ["text", "n"] and len(kind.rows(path)) == len(rows)
        assert kind.fingerprint(str(path), src) == kind.fingerprint(str(path), src)
    assert len(kind_of("d.jsonl").pieces(str(tmp_path / "d.jsonl"), 100)) > 1

"""Bad inputs a user can hand us: each ends as one sentence naming the file or field, exit code 2, nothing half-written.

Data files through every reader (the shared jsonl reader, the mid-training mixture, post-training data),
model folders, config files, and the operating system's refusals (a full disk, an unwritable home)."""

from __future__ import annotations

import errno
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flywheel.cli import main
from flywheel.config import config_summary, validate_config
from flywheel.data.io import read_jsonl, write_json, write_jsonl
from flywheel.data.store import source_texts
from flywheel.errors import FlywheelError, is_permanent_os_error, os_error_sentence
from flywheel.models import check_midtrain_models, check_seq_len, load_model, load_tokenizer
from flywheel.posttrain.data import load_stage_data

from .conftest import byte_tokenizer, capability_missing

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())})
    pq.write_table(table, buf)
    return buf.getvalue()


def _read(reader: str, path: Path, tmp_path: Path, kind: str = "sft") -> object:
    """Read `path` the way `reader` does: the shared jsonl reader, a mixture source, or a post-training stage."""
    if reader == "jsonl":
        return read_jsonl(path)
    if reader == "mixture":
        cfg = validate_config({"name": "x", "home": str(tmp_path / "home"),
                               "data": {"sources": [{"source": str(path)}]}})
        return list(source_texts(cfg, cfg.data.sources[0]))
    cfg = validate_config({"name": "x", "home": str(tmp_path / "home")})
    return load_stage_data(cfg, str(path), {}, kind, "posttrain.stages.0")


NOT_UTF8 = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'  # line 2; 0xe9 is byte 28 of the file (15 + 13)

# (reader, file name, bytes, stage kind, fragments the sentence must hold)
BAD_DATA = [
    ("jsonl", "latin1.jsonl", NOT_UTF8, "sft", ["latin1.jsonl", "line 2", "byte offset 28", "UTF-8"]),
    ("mixture", "latin1.jsonl", NOT_UTF8, "sft", ["latin1.jsonl", "line 2", "byte offset 28", "UTF-8"]),
    ("posttrain", "latin1.jsonl", NOT_UTF8, "sft", ["latin1.jsonl", "line 2", "byte offset 28", "UTF-8"]),
    ("mixture", "latin1.json", b'[{"text": "ok"},\n {"text": "\xff"}]', "sft",
     ["latin1.json", "line 2", "byte offset 28", "0xff"]),
    ("posttrain", "latin1.json", b'[{"text": "ok"},\n {"text": "\xff"}]', "sft",
     ["latin1.json", "line 2", "byte offset 28"]),
    ("jsonl", "broken.jsonl", b'{"text": "a"}\n\n{"text": \n', "sft",
     ["broken.jsonl", "line 3, column", "not valid JSON"]),
    ("mixture", "broken.jsonl", b'{"text": "a"}\n{"text": "b",}\n', "sft",
     ["broken.jsonl", "line 2, column", "not valid JSON"]),
    ("posttrain", "broken.jsonl", b'{"prompt": "a"\n', "sft", ["broken.jsonl", "line 1, column", "not valid JSON"]),
    ("mixture", "broken.json", b'[{"text": "a"},\n {"text": "b",]\n', "sft", ["broken.json", "line 2, column 15"]),
    ("posttrain", "broken.json", b'[\n{"prompt": "a"}\n{"prompt": "b"}]', "sft", ["broken.json", "line 3, column 1"]),
    ("jsonl", "array.jsonl", b'[1, 2]\n', "sft", ["array.jsonl", "line 1 is not a JSON object"]),
    ("mixture", "scalar.json", b"3", "sft", ["scalar.json", "must hold a JSON array of row objects"]),
    ("mixture", "empty.jsonl", b"", "sft", ["empty.jsonl", "is empty (no rows)", "remove this source"]),
    ("mixture", "blank.jsonl", b"\n  \n\n", "sft", ["blank.jsonl", "is empty (no rows)"]),
    ("mixture", "empty.json", b"[]", "sft", ["empty.json", "is empty (no rows)"]),
    ("mixture", "empty.parquet", _parquet([]), "sft", ["empty.parquet", "is empty (no rows)"]),
    ("posttrain", "empty.jsonl", b"", "sft", ["empty.jsonl", "the file has no rows"]),
    ("posttrain", "empty.parquet", _parquet([]), "sft", ["empty.parquet", "the file has no rows"]),
    ("mixture", "body.jsonl", b'{"body": "a"}\n{"body": "b", "id": 2}\n', "sft",
     ["body.jsonl", "has no column 'text' in its first row", "columns: body", "data.sources.0.text_field"]),
    ("mixture", "body.parquet", _parquet([{"body": "a"}]), "sft",
     ["body.parquet", "has no column 'text'", "columns: body", "data.sources.0.text_field"]),
    ("mixture", "junk.parquet", b"PAR1 this is not parquet", "sft", ["junk.parquet", "is not a readable parquet file"]),
    ("posttrain", "junk.parquet", b"not parquet at all", "sft", ["junk.parquet", "is not a readable parquet file"]),
    ("posttrain", "pairs.jsonl", b'{"prompt": "p", "chosen": "c"}\n', "dpo",
     ["pairs.jsonl", "(dpo) needs column(s) prompt, chosen, rejected", "rejected is missing", "found: prompt, chosen",
      "{<your column>: rejected}"]),
    ("posttrain", "qa.jsonl", b'{"question": "q", "response": "r"}\n', "sft",
     ["qa.jsonl", "needs column(s) prompt, completion (or messages)", "{question: prompt, response: completion}"]),
    ("posttrain", "rl.jsonl", b'{"query": "q"}\n', "grpo",
     ["rl.jsonl", "(grpo) needs column(s) prompt", "{query: prompt}"]),
]


@pytest.mark.parametrize(("reader", "name", "data", "kind", "fragments"), BAD_DATA,
                         ids=[f"{r[0]}-{r[1]}-{r[4][1][:24]}" for r in BAD_DATA])
def test_a_bad_data_file_is_one_sentence_naming_the_file_and_the_place(tmp_path, reader, name, data, kind, fragments):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(FlywheelError) as info:
        _read(reader, path, tmp_path, kind)
    msg = str(info.value)
    assert all(f in msg for f in fragments), msg
    assert "\n" not in msg and str(path) in msg
    if reader == "posttrain" and kind == "dpo":
        assert "{prompt: rejected}" not in msg and "{prompt: chosen}" not in msg  # the old, wrong hint


def test_a_source_whose_text_column_is_all_empty_says_so(tmp_path):
    from flywheel.data.mixture import build_mixture

    path = tmp_path / "blank_text.jsonl"
    write_jsonl(path, [{"text": ""}, {"text": None}])
    cfg = validate_config({"name": "x", "home": str(tmp_path / "h"), "data": {"sources": [{"source": str(path)}]}})
    with pytest.raises(FlywheelError, match=r"has no non-empty 'text' documents; fill that column or set text_field"):
        build_mixture(cfg, tok=byte_tokenizer(), tokenizer_id="t")


def test_a_byte_order_mark_and_json_lines_in_a_json_file_are_read_not_rejected(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert read_jsonl(path) == [{"text": "a"}]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    cfg = validate_config({"name": "x", "home": str(tmp_path / "h"), "data": {"sources": [{"source": str(lines)}]}})
    assert list(source_texts(cfg, cfg.data.sources[0])) == ["a", "b"]


def test_a_folder_where_a_data_file_should_be_is_one_sentence(tmp_path):
    with pytest.raises(FlywheelError, match="is a folder, not a data file"):
        read_jsonl(tmp_path)


# --- model folders ---------------------------------------------------------------------------------


def _fake_model(folder: Path, positions: int | None = 512, weights: bool = True, tokenizer: bool = False,
                model_type: str | None = "llama") -> Path:
    """A folder that looks like a checkpoint (files only, nothing loadable): enough for the up-front checks."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = {k: v for k, v in {"model_type": model_type, "max_position_embeddings": positions}.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(conf))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


# (what the folder holds, which loader, the config field it is set as, fragments)
BAD_MODELS = [
    ("empty", "tokenizer", "midtrain.reference",
     ["midtrain.reference: ", "is not a model folder", "no config.json", "no safetensors weights",
      "saved HF checkpoint"]),
    ("empty", "model", "model.source", ["model.source: ", "is not a model folder", "no config.json"]),
    ("config only", "model", "midtrain.reference", ["midtrain.reference: ", "no safetensors weights"]),
    ("no model_type", "model", "midtrain.reference",
     ["midtrain.reference: ", "could not be loaded as a safetensors causal LM", "saved HF checkpoint"]),
    ("missing", "model", None, ["does not exist", "saved HF checkpoint folder"]),
]


@pytest.mark.parametrize(("holds", "loader", "field", "fragments"), BAD_MODELS,
                         ids=[f"{r[0]}-{r[1]}" for r in BAD_MODELS])
def test_a_folder_that_is_not_a_model_names_the_field_and_what_is_missing(tmp_path, holds, loader, field, fragments):
    folder = tmp_path / "ref"
    if holds == "empty":
        folder.mkdir()
    elif holds == "config only":
        _fake_model(folder, weights=False, tokenizer=True)
    elif holds == "no model_type":
        _fake_model(folder, model_type=None, tokenizer=True)
    ref = str(folder) if holds != "missing" else str(tmp_path / "nope")
    doc = {"name": "x", "home": str(tmp_path / "h")}
    if field == "midtrain.reference":
        doc["midtrain"] = {"reference": ref}
    elif field == "model.source":
        doc["model"] = {"source": ref}
    cfg = validate_config(doc)
    with pytest.raises(FlywheelError) as info:
        (load_tokenizer if loader == "tokenizer" else load_model)(cfg, ref)
    msg = str(info.value)
    assert all(f in msg for f in fragments), msg
    assert "Traceback" not in msg and "\n" not in msg


def test_seq_len_longer_than_the_models_positions_names_both_numbers(tmp_path):
    base = _fake_model(tmp_path / "base", positions=512)
    cfg = validate_config({"name": "x", "home": str(tmp_path / "h"), "model": {"source": str(base)},
                           "midtrain": {"seq_len": 4096}})
    with pytest.raises(FlywheelError, match=r"^midtrain\.seq_len: 4096 is longer than the 512 positions model\.source "
                                            r"\(.*base\) has \(max_position_embeddings in its config\.json\); "
                                            r"set midtrain\.seq_len to at most 512$"):
        check_seq_len(cfg, str(base))
    ok = validate_config({"name": "x", "home": str(tmp_path / "h"), "model": {"source": str(base)},
                          "midtrain": {"seq_len": 512}})
    check_midtrain_models(ok, str(base), None)  # fits exactly: no error
    check_seq_len(cfg, str(_fake_model(tmp_path / "unknown", positions=None)))  # no number known: no error
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    with pytest.raises(FlywheelError, match=r"4096 is longer than the 1024 positions .*\(n_positions in its config"):
        check_seq_len(cfg, str(gpt2))


def test_a_reference_with_fewer_positions_than_seq_len_is_caught_before_any_work(tmp_path):
    base = _fake_model(tmp_path / "base", positions=8192)
    ref = _fake_model(tmp_path / "ref", positions=256)
    cfg = validate_config({"name": "x", "home": str(tmp_path / "h"), "model": {"source": str(base)},
                           "midtrain": {"seq_len": 1024, "reference": str(ref)}})
    with pytest.raises(FlywheelError, match=r"1024 is longer than the 256 positions midtrain\.reference"):
        check_midtrain_models(cfg, str(base), str(ref))


def test_midtrain_through_the_console_script_refuses_a_seq_len_the_base_cannot_hold(tmp_path):
    """As a user types it: the base has 512 positions, the config asks 4096; exit 2 before anything is written."""
    base = _fake_model(tmp_path / "base", positions=512, tokenizer=True)
    config = tmp_path / "long.yaml"
    home = tmp_path / "home"
    config.write_text(yaml.safe_dump({"name": "long", "home": str(home), "model": {"source": str(base)},
                                      "midtrain": {"objective": "ntp", "seq_len": 4096}}))
    proc = subprocess.run([FLYWHEEL, "midtrain", str(config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "midtrain.seq_len: 4096 is longer than the 512 positions model.source" in proc.stderr
    assert "set midtrain.seq_len to at most 512" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not home.exists() or not any(home.rglob("*"))


# --- config files ------------------------------------------------------------------------------------

# (config file bytes, fragments): keys given twice name the full field path and both lines; bytes that are not
# UTF-8 name the line and the byte offset
BAD_CONFIG_FILES = [
    (b"name: x\nname: y\n", ["name: given twice, at lines 1 and 2", "remove one"]),
    (b"name: x\nmidtrain:\n  epsilon: 0.1\n  lr: 0.001\n  epsilon: 0.3\n",
     ["midtrain.epsilon: given twice, at lines 3 and 5", "remove one"]),
    (b"name: x\nposttrain:\n  stages:\n    - kind: sft\n    - kind: grpo\n      lr: 1\n      lr: 2\n",
     ["posttrain.stages.1.lr: given twice, at lines 6 and 7"]),
    (b"name: x\nmidtrain: {lr: 0.1, lr: 0.2}\n", ["midtrain.lr: given twice, at lines 2 and 2"]),
    (b"name: x\n# caf\xe9\n", ["is not UTF-8 text at line 2", "byte 0xe9 at byte offset 13", "save it as UTF-8"]),
]


@pytest.mark.parametrize(("data", "fragments"), BAD_CONFIG_FILES, ids=[f[1][0][:30] for f in BAD_CONFIG_FILES])
def test_a_bad_config_file_names_the_field_or_the_line(tmp_path, capsys, data, fragments):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and all(f in err for f in fragments), err
    assert len(err.strip().splitlines()) == 1


def test_the_console_script_rejects_a_key_given_twice(tmp_path):
    """Through the installed entry point, as a user types it."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: x\nmidtrain:\n  epsilon: 0.1\n  epsilon: 0.3\n")
    proc = subprocess.run([FLYWHEEL, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {path}: midtrain.epsilon: given twice, at lines 3 and 4; YAML would "
                                   "silently keep only the last, so remove one")


def test_merge_keys_may_still_be_overridden(tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text("name: x\nmidtrain: &m {lr: 0.1}\nworld:\n  seq_len: 64\nevaluation:\n  limit: 5\n")
    assert main(["validate", str(path)]) == 0
    path.write_text("name: x\nx-common: &c {epsilon: 0.1}\nmidtrain:\n  <<: *c\n  epsilon: 0.3\n")
    assert main(["validate", str(path)]) == 2
    assert "given twice" not in capsys.readouterr().err  # only the unknown x-common section is reported


def test_a_home_that_is_a_file_prints_the_path_as_text(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("FLYWHEEL_HOME", str(afile))  # the default home arrives as a Path, not a str
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"home: exists and is not a folder; point home at a folder (got '{afile}')" in err, err
    assert "PosixPath" not in err


def test_an_unknown_ablation_study_is_one_sentence_before_any_server_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    assert main(["ablate", str(path), "--study", "doses"]) == 2
    captured = capsys.readouterr()
    assert "error: --study: must be one of dose, strong (got 'doses')" in captured.err
    assert "prefect" not in (captured.out + captured.err).lower()  # refused before a Prefect server started


def test_the_summary_says_which_rewards_a_grpo_stage_uses_and_whether_they_are_the_default():
    default = dict(config_summary(validate_config({"name": "x"})))["post-training"]
    assert default == "sft → grpo; stage 1 rewards: math_answer, format (the default: rewards is not set)"
    chosen = validate_config({"name": "x", "posttrain": {"stages": [{"kind": "grpo", "rewards": ["format"]}]}})
    assert dict(config_summary(chosen))["post-training"] == "grpo; stage 0 rewards: format"


# --- the operating system says no --------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 200 KB tmpfs: a world build fills it while writing the corpora (needs root, as in this container)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        capability_missing(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); "
                    "the simulated ENOSPC tests below cover cli.main")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_sentence_and_leaves_nothing_half_written(tiny_tmpfs, tmp_path):
    home = tiny_tmpfs / "home"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "full", "home": str(home),
                                      "world": {"pretrain_docs": 6000, "midtrain_docs": 1000}}))
    proc = subprocess.run([FLYWHEEL, "world", "build", str(config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: disk full while writing ") and f"(home {home})" in err
    assert ".jsonl" in err  # the file it was writing, not "a file"
    assert "free space or point `home` at a larger disk" in err
    assert [p for p in home.rglob("*") if p.is_file()] == []  # temp files and folders all removed


def test_an_unwritable_home_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    home = tmp_path / "locked"
    home.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\nhome: {home}\n")
    monkeypatch.setattr("flywheel.config.os.access", lambda *a, **k: False)  # as a non-root user would see it
    assert main(["world", "build", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"error: home: {home} is not writable for this user" in err and "point home" in err, err
    assert "PosixPath" not in err and list(home.iterdir()) == []


def test_a_home_on_a_read_only_file_system_is_refused_before_any_work(tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mnt)], capture_output=True).returncode:
        capability_missing("cannot mount a read-only tmpfs here (needs root)")
    try:
        config = tmp_path / "c.yaml"
        config.write_text(f"name: x\nhome: {mnt / 'home'}\n")
        assert main(["midtrain", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"home: {mnt / 'home'} cannot be created ({mnt} is on a read-only file system)" in err, err
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _wrapped(inner: BaseException, how: str) -> BaseException:
    """`inner` as it reaches the CLI: raised as the cause or context of another error, or inside a group."""
    if how == "cause":
        try:
            raise RuntimeError("(sqlalchemy) autoflush failed") from inner
        except RuntimeError as exc:
            return exc
    if how == "context":
        try:
            try:
                raise inner
            except BaseException:  # noqa: BLE001
                raise KeyError("unrelated") from None  # even a suppressed context is walked
        except KeyError as exc:
            return exc
    if how == "group":
        return ExceptionGroup("tasks failed", [ValueError("other"), _wrapped(inner, "cause")])
    return inner


class _SafetensorError(Exception):
    """Like safetensors' own: a full disk surfaces as text from Rust, not as an OSError."""


# (the error behind the failure, how it is wrapped, fragments of the sentence)
OS_ERRORS = [
    (OSError(errno.ENOSPC, "No space left on device", "/h/world/corpora/sft.jsonl"), "cause",
     ["disk full while writing /h/world/corpora/sft.jsonl", "free space", "rerun resumes"]),
    (OSError(errno.ENOSPC, "No space left on device"), "group", ["disk full while writing a file"]),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/h/runs/x"), "context", ["quota exceeded while writing /h/runs/x"]),
    (sqlite3.OperationalError("database or disk is full"), "cause",
     ["disk full while writing the SQLite tracking store", "free space"]),
    (PermissionError(errno.EACCES, "Permission denied", "/h/mlflow.db"), "cause",
     ["permission denied for /h/mlflow.db", "point `home` (or FLYWHEEL_HOME) at a folder you can write"]),
    (OSError(errno.EROFS, "Read-only file system", "/h/cache"), "plain", ["/h/cache is on a read-only file system"]),
    (_SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "cause",
     ["disk full while writing a file (reported by _SafetensorError, home ", "free space"]),  # Rust io errors: no OSError
]


@pytest.mark.parametrize(("inner", "how", "fragments"), OS_ERRORS,
                         ids=[f"{type(r[0]).__name__}-{r[1]}" for r in OS_ERRORS])
def test_disk_and_permission_errors_anywhere_in_the_chain_become_one_sentence(tmp_path, capsys, monkeypatch,
                                                                            inner, how, fragments):
    config = tmp_path / "c.yaml"
    home = tmp_path / "home"
    config.write_text(f"name: x\nhome: {home}\n")

    def fails(cfg, size=None):  # noqa: ANN001
        raise _wrapped(inner, how)

    monkeypatch.setattr("flywheel.world.build.build_world", fails)
    assert main(["world", "build", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert all(f in err for f in fragments) and f"home {home})" in err, err
    assert is_permanent_os_error(_wrapped(inner, how))


def test_other_errors_are_not_mistaken_for_disk_or_permission_problems():
    assert not is_permanent_os_error(_wrapped(FileNotFoundError(errno.ENOENT, "gone", "/x"), "cause"))
    assert not is_permanent_os_error(_wrapped(ValueError("bad"), "group"))
    assert not is_permanent_os_error(ConnectionResetError(errno.ECONNRESET, "reset"))  # worth a retry
    assert os_error_sentence(RuntimeError("plain bug")) is None


def test_a_write_that_runs_out_of_space_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(obj, f, **kw):  # noqa: ANN001
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")  # what a real write reports: no file name

    monkeypatch.setattr("flywheel.data.io.json.dump", full)
    with pytest.raises(OSError) as info:
        write_json(tmp_path / "meta.json", {"a": 1})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "meta.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("error", "quiet"), [
    (_wrapped(OSError(errno.ENOSPC, "No space left on device"), "cause"), True),
    (FlywheelError("data.sources.0.source: bad"), True),
    (ValueError("a bug"), False),  # a real bug keeps its traceback in the log
])
def test_prefect_logs_keep_one_line_but_no_traceback_for_user_and_disk_errors(error, quiet):
    import logging

    from flywheel.errors import QuietUserErrors

    record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception", None,
                               (type(error), error, None))
    assert QuietUserErrors().filter(record) is True  # the line itself is always kept
    assert (record.exc_info is None) == quiet


@pytest.mark.parametrize("argv, says", [(["rehearse", "CONFIG", "--rows", "0"], "Invalid value for"),
                                        (["run", "CONFIG", "--rounds", "x"], "Invalid value for"),
                                        (["world", "build", "CONFIG", "--verbose"], "No such option: --verbose")])
def test_a_bad_option_is_a_usage_line_and_exit_2_not_a_traceback(tmp_path, capsys, argv, says):
    path = tmp_path / "ok.yaml"
    path.write_text(f"name: ok\nhome: {tmp_path / 'home'}\n")
    assert main([str(path) if a == "CONFIG" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "home").exists()  # nothing started

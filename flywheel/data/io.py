"""Small, atomic file helpers shared by every stage that writes artefacts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def publish(tmp: str | Path, final: Path) -> None:
    """Rename a finished temp file or folder into place with the permissions a plain write would give.

    mkstemp/mkdtemp create 0600/0700 so a half-written temp is private; the published artefact
    (a checkpoint, a report, a cache chunk) must be readable by the team like any other file.
    """
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask())
    os.replace(tmp, final)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows to a temp file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    publish(f.name, path)
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a jsonl file, naming the file and line when a line is not a JSON object."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FlywheelError(f"{path}: line {i} is not valid JSON ({exc.msg}); fix or remove it") from None
                if not isinstance(row, dict):
                    raise FlywheelError(f"{path}: line {i} is not a JSON object; each line must be {{...}}")
                rows.append(row)
    except FileNotFoundError:
        raise FlywheelError(f"{path}: file not found; check the path") from None
    except UnicodeDecodeError:
        raise FlywheelError(f"{path}: is not UTF-8 text; re-encode it as UTF-8") from None
    return rows


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    publish(f.name, path)


def fingerprint(*parts: Any) -> str:
    """A short content hash of JSON-able parts: the basis of every cache key."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """Hash of a file's bytes, streamed, for data fingerprints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only when complete.

    If the body raises, the temporary folder is removed and `final` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # someone finished the same build first; theirs is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        publish(tmp, final)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest Trainer checkpoint that finished writing; half-written ones (a kill mid-save) are removed.

    The HF Trainer writes `checkpoint-N/` in place and its `trainer_state.json` last, so a
    folder without it was interrupted and cannot be resumed from.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if not (path.is_dir() and step.isdigit()):
            continue
        if (path / "trainer_state.json").exists():
            found.append((int(step), path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    return str(max(found)[1]) if found else None

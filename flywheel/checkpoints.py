"""Checkpoint folders you can trust: a manifest written last, verified before reuse, scanned for NaN/inf.

A stage publishes its model folder with `atomic_dir`, so a crash never leaves half a folder under
the final name; but a disk can still truncate or change a file later (`truncate -s`, a full disk
during a copy, bit rot). So every published folder carries `flywheel-manifest.json` (each file's
relative path, size and sha256), written last inside the temp folder, and a "finished already"
path reuses a folder only when `verify_checkpoint` finds it intact. A folder without a manifest
(written before manifests existed, or by hand) counts as unverified and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

from flywheel.data.io import atomic_dir, write_json
from flywheel.errors import FlywheelError

MANIFEST = "flywheel-manifest.json"
MANIFEST_VERSION = 1
BLOCK = 1 << 20  # hash in 1 MiB blocks: bounded memory for multi-GB shards


def sha256_file(path: Path) -> str:
    """The file's sha256, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file under `folder` (path, size, sha256); call it last, before the atomic rename."""
    folder = Path(folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    write_json(folder / MANIFEST, {"version": MANIFEST_VERSION, "files": files})
    return folder / MANIFEST


def safetensors_header_problem(path: Path) -> str | None:
    """Why a .safetensors file's header cannot be read (None when it can and its data fits in the file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "has no safetensors header (file too short)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"has a safetensors header of {n} bytes but the file holds only {size} (truncated)"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"has an unreadable safetensors header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "has an unreadable safetensors header (not a JSON object)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"needs {8 + n + end} bytes for its tensors but holds {size} (truncated)"
    return None


def verify_checkpoint(folder: Path) -> str | None:
    """None when `folder` matches its manifest file for file; otherwise a short reason why not."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder is missing"
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"it has no {MANIFEST} (an older or interrupted save), so it cannot be verified"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for entry in files:
        path = folder / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{entry['path']} is {size} bytes, the manifest says {entry['size']} (truncated or changed)"
        if path.suffix == ".safetensors":
            problem = safetensors_header_problem(path)
            if problem:
                return f"{entry['path']} {problem}"
        if sha256_file(path) != entry["sha256"]:
            return f"{entry['path']} does not match its checksum (changed on disk)"
    return None


def reuse_verified(folder: Path, log: logging.Logger) -> bool:
    """True when a finished `folder` verifies; a folder that does not is logged with the reason and removed."""
    folder = Path(folder)
    if not folder.exists():
        return False
    why = verify_checkpoint(folder)
    if why is None:
        return True
    log.warning("%s: not reused because %s; removing it and building it again", folder, why)
    shutil.rmtree(folder, ignore_errors=True)
    return False


def first_non_finite(folder: Path) -> str | None:
    """The name of the first tensor holding a NaN or inf in `folder`'s safetensors files (None: all finite).

    Streams one tensor at a time (memory-mapped), so a multi-GB checkpoint never sits in memory whole.
    """
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FlywheelError(f"{folder}: no .safetensors weights to check; is this a model folder?")
    for shard in shards:
        problem = safetensors_header_problem(shard)
        if problem:
            raise FlywheelError(f"{shard}: {problem}; rebuild the checkpoint")
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return name
    return None


def _cast(model: Any, state: dict | None, dtype: str | None) -> dict | None:
    """The state dict with its floating tensors in `dtype` (None: as they are, and no copy made)."""
    import torch

    if dtype is None or all(p.dtype == getattr(torch, dtype) for p in model.parameters()):
        return state
    state = state if state is not None else model.state_dict()
    return {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}


def _set_config_dtype(folder: Path, dtype: str) -> None:
    """config.json names the dtype the weights were written in (what `dtype="auto"` loads)."""
    path = folder / "config.json"
    conf = json.loads(path.read_text())
    conf["dtype"] = dtype
    write_json(path, conf)


def publish_trained(trainer: Any, tokenizer: Any, final: Path, record_file: str, record: dict[str, Any],
                    dtype: str | None = None) -> None:
    """Publish a trained model as one plain HF folder: the full weights, whatever the sharding, in `dtype`
    (the precision policy's published dtype: float32 master weights are written in model.dtype).

    Every rank calls this: under FSDP the full state dict is a collective gather (to rank 0, on the
    CPU), so a rank-0-only `save_pretrained` would write rank 0's shard. Rank 0 then writes the
    safetensors, the tokenizer, the stage's record and, last, the manifest, inside `atomic_dir`.
    """
    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        model = acc.unwrap_model(trainer.model)
        state = _cast(model, state, dtype)
        if state is not None:  # gathered or cast tensors no longer share storage: drop the tied copies
            for tied in getattr(model, "all_tied_weights_keys", None) or {}:
                state.pop(tied, None)
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if dtype is not None:
                _set_config_dtype(tmp, dtype)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / record_file, record)
            write_manifest(tmp)  # last: reuse verifies against it

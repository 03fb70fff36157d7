"""The Hugging Face Hub as the hub libraries see it: whether they are offline, and one sentence when a fetch fails.

Imported by refs, models, data and posttrain; imports nothing of flywheel but errors, so every layer may use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flywheel.errors import FlywheelError, hub_error, hub_reason

T = TypeVar("T")
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # what huggingface_hub and datasets read as true
_HUB_SEEN: set[tuple[str, str]] = set()  # (repo type, id) the hub answered for in this process


def offline_switch(repo_type: str = "model") -> str | None:
    """The variable that keeps the hub offline for a model or a dataset ("HF_HUB_OFFLINE=1"), None when online.

    Read as the libraries read it: huggingface_hub (models) takes HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE;
    datasets takes HF_DATASETS_OFFLINE before those.
    """
    keys = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
    if repo_type == "dataset":
        keys.insert(0, "HF_DATASETS_OFFLINE")
    for key in keys:
        value = os.environ.get(key)
        if value:  # the first one set decides, as in the libraries
            return f"{key}={value}" if value.strip().upper() in _TRUE else None
    return None


def hub_cached(ref: str, repo_type: str) -> bool:
    """Whether the hub cache (or, for a dataset, datasets' own cache) holds anything of `ref`."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folders = [Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref, repo_type=repo_type) / "snapshots"]
    if repo_type == "dataset":
        import datasets

        folders.append(Path(datasets.config.HF_DATASETS_CACHE) / ref.replace("/", "___"))
    return any(f.is_dir() and any(f.iterdir()) for f in folders)


def _hub_endpoint() -> str:
    hub = sys.modules.get("huggingface_hub.constants")
    return getattr(hub, "ENDPOINT", "https://huggingface.co")


def hub_failure(field: str | None, ref: str, exc: BaseException, repo_type: str = "model") -> FlywheelError | None:
    """The one sentence for `exc` when it is a failure to fetch `ref` from the hub, else None."""
    why = hub_reason(exc, offline_switch(repo_type), _hub_endpoint())
    return None if why is None else hub_error(field, ref, why, repo_type)


def check_hub_access(field: str | None, ref: str, repo_type: str = "model") -> None:
    """Online and not cached: ask the hub about `ref` once, without retries, before loading it.

    huggingface_hub retries a refused connection five times per file (about 25 s each, more for a model), with
    a warning per try; this asks once (HF_HUB_ETAG_TIMEOUT bounds it) and turns no network, an unknown or a
    private id into one sentence. Offline, or with anything cached, the load itself decides (and is worded by
    hub_failure).
    """
    if offline_switch(repo_type) or (repo_type, ref) in _HUB_SEEN or hub_cached(ref, repo_type):
        return
    from huggingface_hub import HfApi, constants

    try:
        HfApi().repo_info(ref, repo_type=repo_type, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a probe: what it cannot word, the load itself meets and reports
        failure = hub_failure(field, ref, exc, repo_type)
        if failure is not None:
            raise failure from None
        return
    _HUB_SEEN.add((repo_type, ref))


def worded_hub_call(field: str | None, ref: str, call: Callable[[], T], repo_type: str, fix: str) -> T:
    """`call()`, with a failure to reach or find `ref` on the hub as its one sentence (hub_failure), and any
    other error of the hub libraries as one sentence ending in `fix`."""
    try:
        return call()
    except FlywheelError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, revision or split: all one sentence
        failure = hub_failure(field, ref, exc, repo_type)
        if failure is not None:
            raise failure from None
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FlywheelError(f"{field + ': ' if field else ''}{ref}: the hub answered {type(exc).__name__} "
                            f"({first}); {fix}") from None

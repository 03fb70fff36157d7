"""The offline, no-telemetry environment, read from `offline.env` (the one place it is written down)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE = Path(__file__).with_name("offline.env")


def offline_env() -> dict[str, str]:
    """Parse offline.env so Python code and the Makefile agree on one list."""
    env: dict[str, str] = {}
    for raw in ENV_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip()
    return env


# The keys of offline.env that switch the hub libraries offline; the rest (telemetry off, tokenizer threads, the
# Prefect start-up timeout) hold for every command. huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE),
# datasets HF_DATASETS_OFFLINE before either: all three are set together, once, before any of them is imported.
OFFLINE_SWITCH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # what huggingface_hub and datasets read as true
TELEMETRY_OFF = tuple(k for k in offline_env() if k not in OFFLINE_SWITCH)  # set for every command


def apply_offline_env(force: bool = False, offline: bool = True) -> None:
    """Set the offline.env variables before any HF/MLflow/Prefect import reads them.

    A variable the user already set wins unless `force` (tests force, so a stray shell setting cannot make them
    reach the network). `offline=False` leaves out the offline switch (OFFLINE_SWITCH) and sets only the rest.
    """
    for key, value in offline_env().items():
        if not offline and key in OFFLINE_SWITCH:
            continue
        if force or key not in os.environ:
            os.environ[key] = value


def _local_model(ref: str | None) -> bool:
    from flywheel.config import _is_local_path

    return ref is None or ref.startswith("world:") or _is_local_path(ref)


def _local_data(ref: str | None) -> bool:
    from glob import has_magic

    from flywheel.config import DATA_FILE_SUFFIXES, _is_local_path

    return (ref is None or ref.startswith("world:") or has_magic(ref) or ref.endswith(DATA_FILE_SUFFIXES)
            or _is_local_path(ref))


def hub_references(cfg, models: tuple[str | None, ...] = ()) -> list[tuple[str, str]]:  # noqa: ANN001 - FlywheelConfig
    """(field, reference) for everything the config (and `models`, e.g. a --reference option) would fetch from the
    Hugging Face Hub: model, tokenizer and reference ids, hub datasets, and lm-eval tasks other than the bundled
    ones (lm-eval downloads their data). `world:` references and local paths are not on the hub.
    """
    from flywheel.evaluation.registry import BUNDLED, PRESETS

    found = [(field, ref) for field, ref in (("model.source", cfg.model.source), ("model.tokenizer", cfg.model.tokenizer),
                                            ("midtrain.reference", cfg.midtrain.reference))
             if not _local_model(ref)]
    found += [("option", ref) for ref in models if not _local_model(ref)]
    found += [(f"data.sources.{i}.source", s.source) for i, s in enumerate(cfg.data.sources) if not _local_data(s.source)]
    found += [(f"posttrain.stages.{i}.data", s.data) for i, s in enumerate(cfg.posttrain.stages)
              if not _local_data(s.data)]
    for name in cfg.evaluation.tasks:
        members = [t for t, _ in PRESETS[name]] if name in PRESETS else [name]
        found += [("evaluation.tasks", t) for t in members if t not in BUNDLED]
    return found


def apply_cli_env(needs_hub: bool) -> bool:
    """The CLI's environment for one command; returns whether the hub libraries will run offline.

    The telemetry-off variables of offline.env are set for every command. The offline switch is the user's when
    HF_HUB_OFFLINE is set (either value; the other two switch keys follow it unless set too); otherwise the
    command goes offline exactly when it needs nothing from the hub (`needs_hub`, see hub_references), so a
    hub config can download and the tiny world never reaches the network.
    """
    apply_offline_env(offline=False)
    user = os.environ.get("HF_HUB_OFFLINE")
    if user is not None:
        for key in OFFLINE_SWITCH:
            os.environ.setdefault(key, user)
        return user.strip().upper() in _TRUE
    if not needs_hub:
        apply_offline_env(offline=True)
    return offline_switch() is not None


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


# glibc's malloc hands blocks over its mmap threshold straight back to the OS when freed and trims the heap
# top past M_TRIM_THRESHOLD, so on CPU every training step's large activations page-fault in afresh (measured:
# reference scoring 39.6 ms/row at 64 rows vs 29 at 8-16; an online ReMiT step made 2x NTP's page faults).
# Fixing both thresholds keeps freed memory for reuse. mallopt's parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the measured setting; blocks above it still get their own mmap
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to ~2 GiB of freed heap before trimming


def keep_freed_memory() -> bool:
    """Tune glibc malloc for CPU training in this process; False where it does not apply (not glibc).

    The same effect as starting the process with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, applied
    from inside so `flywheel midtrain` and `score-reference` get it however they are launched.
    A variable the user already set wins.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok &= bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok &= bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return ok

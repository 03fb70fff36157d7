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


def apply_offline_env(force: bool = False) -> None:
    """Set the offline variables before any HF/MLflow/Prefect import reads them.

    A variable the user already set wins unless `force` (tests force, so a stray
    shell setting cannot make them reach the network).
    """
    for key, value in offline_env().items():
        if force or key not in os.environ:
            os.environ[key] = value


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

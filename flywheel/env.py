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

"""The offline, no-telemetry environment, read from `offline.env` (the one place it is written down)."""

from __future__ import annotations

import os
from pathlib import Path

from flywheel.hub import _TRUE

# it lives with the hub checks; importable from here too
from flywheel.hub import offline_switch as offline_switch
from flywheel.refs import CORPUS_REF, MODEL_REF, parse_ref

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
# Prefect start-up timeout, no MLflow run links on stdout) hold for every command. huggingface_hub reads
# HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), datasets HF_DATASETS_OFFLINE before either: all three are set
# together, once, before any of them is imported.
OFFLINE_SWITCH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
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


def _on_hub(ref: str | None, data: bool = False) -> bool:
    """Whether a model (or, `data`, a dataset) reference names something on the hub."""
    return ref is not None and parse_ref(ref, allowed=CORPUS_REF if data else MODEL_REF, strict=False).kind == "hub"


def hub_references(cfg, models: tuple[str | None, ...] = ()) -> list[tuple[str, str]]:  # noqa: ANN001 - FlywheelConfig
    """(field, reference) for everything the config (and `models`, e.g. a --reference option) would fetch from the
    Hugging Face Hub: model, tokenizer and reference ids, hub datasets, and lm-eval tasks other than the bundled
    ones (lm-eval downloads their data). `world:` references and local paths are not on the hub.
    """
    from flywheel.evaluation.registry import BUNDLED, PRESETS

    found = [(field, ref) for field, ref in (("model.source", cfg.model.source), ("model.tokenizer", cfg.model.tokenizer),
                                            ("midtrain.reference", cfg.midtrain.reference))
             if _on_hub(ref)]
    found += [("option", ref) for ref in models if _on_hub(ref)]
    found += [(f"data.sources.{i}.source", s.source) for i, s in enumerate(cfg.data.sources) if _on_hub(s.source, True)]
    found += [(f"posttrain.stages.{i}.data", s.data) for i, s in enumerate(cfg.posttrain.stages)
              if _on_hub(s.data, True)]
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


# --- one CLI command's process: what runs before the command itself ----------------------------------------


def command_config(args: list[str]) -> str | None:
    """The config file a command line names (`demo` and `world build` default to configs/demo.yaml)."""
    words = [a for a in args if not a.startswith("-")]
    found = next((a for a in args if a.endswith((".yaml", ".yml"))), None)
    if found is None and words[:2] in (["demo"], ["world", "build"]):
        return "configs/demo.yaml"
    return found


def prepare_command(args: list[str], config_arg: str | None) -> None:
    """Offline or not, and the home checked writable, before the command imports any hub library.

    Offline unless the config (or a --reference/--base option) names something on the hub, or the user set
    HF_HUB_OFFLINE: transformers, datasets and huggingface_hub read the switch once, at import.
    """
    from flywheel.config import check_home_writable, load_config
    from flywheel.errors import FlywheelError

    words = [a for a in args if not a.startswith("-")]
    early = None
    if words and "--help" not in args and config_arg:
        try:
            early = load_config(config_arg)
        except FlywheelError:
            early = None  # the command itself reports why it does not load
    options = tuple(a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else None)
                    for i, a in enumerate(args) if a.partition("=")[0] in ("--reference", "--base"))
    apply_cli_env(bool(early is not None and hub_references(early, options)))
    if early is not None and words[0] not in ("validate", "lineage", "deploy"):
        check_home_writable(early)  # before any work, so nothing is half-written


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM ends the command through Python's normal exit, so atexit stops Prefect's temporary server.

    Prefect turns SIGTERM into a crash of the flow run and then re-sends it to the handler it found;
    with the default one the process died on the spot and left its temporary server running.
    """
    import signal
    import threading

    def _exit(signum, frame) -> None:  # noqa: ANN001
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit)


def use_flywheel_prefect(home: Path) -> None:
    """Flows record to the flywheel's own embedded Prefect store under `home` unless a server is configured."""
    exit_cleanly_on_sigterm()
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
        # Prefect creates only the last folder of its home: a fresh flywheel home failed the first run.
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLYWHEEL_HOME", str(home))

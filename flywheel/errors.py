"""Errors meant for people: one sentence naming the field or file, what is wrong, what to do."""

from __future__ import annotations

import errno as _errno
import logging
import re as _re
from collections.abc import Iterator as _Iterator


class FlywheelError(Exception):
    """A problem with the user's input. The CLI prints it without a traceback and exits 2."""

    exit_code = 2


class ConfigError(FlywheelError):
    """A config that does not validate; carries one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(problems))


class NonFiniteError(FlywheelError):
    """Training produced a NaN/inf loss, gradient or weight; stopped before it reached any checkpoint."""


class Preempted(FlywheelError):
    """Training stopped by SIGTERM after saving a checkpoint; rerunning the same command resumes it.

    Exit code 143 (128 + SIGTERM), what a process killed by SIGTERM reports, so schedulers see a preemption.
    """

    exit_code = 143


# --- operating-system errors that no retry can fix --------------------------------------------

DISK_FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})
PERMANENT_ERRNOS = DISK_FULL_ERRNOS | {_errno.EACCES, _errno.EPERM, _errno.EROFS}
# Errors that are not OSErrors but carry one in their text: SQLite (through SQLAlchemy and MLflow) and Rust
# libraries (safetensors, tokenizers), whose io::Error reads "No space left on device (os error 28)".
_TEXT_ERRNOS = (("database or disk is full", _errno.ENOSPC), ("No space left on device", _errno.ENOSPC),
                ("Disk quota exceeded", _errno.EDQUOT), ("Read-only file system", _errno.EROFS))
_RUST_OS_ERROR = _re.compile(r"\(os error (\d+)\)")


def exception_chain(exc: BaseException) -> _Iterator[BaseException]:
    """Every exception behind `exc`: causes, contexts and the members of exception groups, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend(getattr(cur, "exceptions", ()) if isinstance(cur, BaseExceptionGroup) else ())
        todo.extend((cur.__context__, cur.__cause__))


def _os_errno(exc: BaseException) -> int | None:
    """The errno an exception stands for; SQLite's "database or disk is full" counts as ENOSPC."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the original error
        return None
    rust = _RUST_OS_ERROR.search(text)
    if rust:
        return int(rust.group(1))
    return next((code for phrase, code in _TEXT_ERRNOS if phrase in text), None)


def find_os_error(exc: BaseException, errnos: frozenset[int] | set[int]) -> BaseException | None:
    """The first exception in `exc`'s chain whose errno is one of `errnos`, or None."""
    return next((e for e in exception_chain(exc) if _os_errno(e) in errnos), None)


def is_permanent_os_error(exc: BaseException) -> bool:
    """True for a full disk, an exceeded quota, a denied permission or a read-only file system anywhere in
    `exc`'s chain: retrying cannot fix those, so a retry condition should give up at once."""
    return find_os_error(exc, PERMANENT_ERRNOS) is not None


def os_error_sentence(exc: BaseException, home: str | None = None) -> str | None:
    """One sentence for a full disk or an unwritable folder behind `exc` (None when it is neither)."""
    found = find_os_error(exc, DISK_FULL_ERRNOS) or find_os_error(exc, PERMANENT_ERRNOS)
    if found is None:
        return None
    code = _os_errno(found)
    name = getattr(found, "filename", None) if isinstance(found, OSError) else None
    notes = [f"home {home}"] if home else []
    if name is not None:
        what = str(name)
    elif not isinstance(found, OSError) and "database or disk is full" in str(found):
        what = "the SQLite tracking store"
    else:
        what = "a file"
        if not isinstance(found, OSError):  # the error says so only in its text: name who reported it
            notes.insert(0, f"reported by {type(found).__name__}")
    where = f" ({', '.join(notes)})" if notes else ""
    if code in DISK_FULL_ERRNOS:
        kind = "quota exceeded" if code == _errno.EDQUOT else "disk full"
        return (f"{kind} while writing {what}{where}: free space or point `home` at a larger disk; "
                "completed work is kept and the rerun resumes")
    if code == _errno.EROFS:
        return (f"{what} is on a read-only file system{where}: point `home` (or FLYWHEEL_HOME) at a "
                "writable folder")
    return (f"permission denied for {what}{where}: fix its permissions for this user or point `home` "
            "(or FLYWHEEL_HOME) at a folder you can write")


class QuietUserErrors(logging.Filter):
    """Drops the traceback from a log record whose exception is a user error or a full/unwritable disk.

    Prefect logs every failed task and flow with its traceback; for these the CLI prints one sentence
    instead, so the log keeps only its one line ("... Encountered exception during execution: ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (isinstance(exc, FlywheelError) or is_permanent_os_error(exc)):
            record.exc_info, record.exc_text = None, None
        return True


# --- a team server's database (PostgreSQL) ------------------------------------------------------


def database_error_sentence(uri: str, message: str, user: str | None = None, host: str | None = None,
                            port: int | None = None, database: str | None = None) -> str:
    """One sentence for a tracking store whose database refused the connection (`message`: the driver's text).

    `uri` must already have its password masked: the sentence is printed and logged.
    """
    where = f"{host or 'localhost'}:{port or 5432}"
    head = f"tracking store {uri}"
    text = message.lower()
    if "password authentication failed" in text or "no password supplied" in text:
        return (f"{head}: PostgreSQL at {where} refused the password of user '{user}'; put the right one in "
                "MLFLOW_TRACKING_URI (credentials belong in the environment, never in the config file)")
    if f'database "{database}" does not exist' in text:
        return (f"{head}: the database '{database}' does not exist on {where}; create it "
                f"(createdb -h {host} -p {port} -U {user} {database}) or fix the database name in the URI")
    if any(s in text for s in ("connection refused", "could not connect", "timeout expired", "timed out",
                               "could not translate host name", "name or service not known", "no route to host",
                               "network is unreachable")):
        return (f"{head}: cannot reach the PostgreSQL server at {where}; start it, or fix the host and port in "
                "tracking.uri / MLFLOW_TRACKING_URI")
    first = message.strip().splitlines()[0] if message.strip() else "no reason given"
    return f"{head}: PostgreSQL at {where} refused the connection ({first}); check the URI and the server's log"


# --- the Hugging Face Hub ------------------------------------------------------------------------

_HUB_NETWORK_ERRORS = frozenset({"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                                 "ReadTimeout", "TimeoutException", "NetworkError", "ProxyError", "gaierror"})
_HUB_NETWORK_TEXT = ("couldn't connect to", "couldn't reach", "offlinemodeisenabled", "is not cached in",
                     "name or service not known", "network is unreachable", "connection refused")


def hub_reason(exc: BaseException, offline_switch: str | None,
               endpoint: str = "https://huggingface.co") -> tuple[str, str] | None:
    """Why a fetch from the Hugging Face Hub failed: (kind, a few words), or None when `exc` is no hub failure.

    kind is offline, network, missing, gated or revision. `offline_switch` names the variable that keeps this
    process offline ("HF_HUB_OFFLINE=1"), None when online. huggingface_hub, transformers and datasets wrap their
    errors differently, so the chain is read by class name (no import needed) and, where a wrapper kept only the
    text, by the words they use.
    """
    chain = list(exception_chain(exc))
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    texts = " ".join(str(e) for e in chain).lower()
    if "GatedRepoError" in names or "you are trying to access a gated repo" in texts:
        return "gated", "it is gated: accept its terms on its Hub page and log in with `hf auth login`"
    if "RevisionNotFoundError" in names:
        return "revision", "the revision does not exist"
    if "RepositoryNotFoundError" in names or "is not a valid model identifier" in texts:
        return "missing", "no such repository, or a private one and you are not logged in"
    if names & _HUB_NETWORK_ERRORS or any(t in texts for t in _HUB_NETWORK_TEXT):
        if offline_switch:
            return "offline", f"offline: {offline_switch} is set"
        return "network", f"no network: cannot reach {endpoint}"
    return None


def hub_error(field: str | None, ref: str, why: tuple[str, str], repo_type: str = "model") -> FlywheelError:
    """One sentence for a model or dataset the hub did not give: the field, the id, why, and what to do."""
    kind, words = why
    head = f"{field}: " if field else ""
    where = field or "it"
    dataset = repo_type == "dataset"
    what = f"the dataset '{ref}'" if dataset else f"'{ref}'"
    local = "a downloaded .jsonl/.json/.parquet file" if dataset else "a local folder"
    if kind == "missing":
        todo = f"check the id (or log in with `hf auth login`) or point {where} at {local}"
    elif kind == "revision":
        todo = f"fix model.revision or point {where} at {local}"
    else:
        get = f"hf download --repo-type dataset {ref} --local-dir DIR" if dataset else f"hf download {ref}"
        todo = f"download it first ({get}) or point {where} at {local}"
    return FlywheelError(f"{head}could not fetch {what} from the Hugging Face Hub ({words}); {todo}")

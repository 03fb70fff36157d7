"""References: every way the config (or an option) names a model or data, parsed once and resolved here.

A reference is one of:

    world:<size> / world:<corpus>   the offline tiny world's base model or corpus (built by `flywheel world build`)
    a local file, folder or glob    ./data.jsonl, /models/base, shards/*.parquet
    a hub id                        org/name on the Hugging Face Hub
    a registry reference            models:/name@alias or models:/name/3 (MLflow's model registry)

`parse_ref` turns the text into a typed `Ref` (the config's validators call it, with the same errors);
`local_path`, `model_location` and `data_files` turn a `Ref` into what a stage reads. The tiny world's
address book (`world_paths`) lives here too, so the layers below the round never import flywheel.world.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from glob import glob, has_magic
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from flywheel.data.compressed import looks_like_compressed
from flywheel.data.io import fingerprint
from flywheel.data.kinds import DATA_FILE_SUFFIXES, DATA_FILE_WORDS
from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig, WorldConfig

WORLD_SIZES = ("nano", "micro", "mini")
WORLD_CORPORA = ("pretrain", "midtrain", "sft", "dpo", "rl", "eval", "eval_mc")
WORLD_VERSION = 1  # bump when the world's generator or corpora change meaning (it names the world folders)
WORLD_PREFIX, REGISTRY_PREFIX = "world:", "models:/"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_REGISTRY_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")

RefKind = Literal["world", "file", "folder", "glob", "hub", "registry"]


@dataclass(frozen=True)
class RefUse:
    """What one kind of field accepts: a model, a post-training stage's data, or a mid-training source."""

    name: str
    kinds: tuple[str, ...]  # the reference kinds the field takes
    world_names: tuple[str, ...]  # what may follow `world:`
    world_what: str  # "size" or "corpus", for the error
    wording: str  # the error for text that is none of them


MODEL_REF = RefUse("model", ("world", "folder", "hub"), WORLD_SIZES, "size",
                   "must be world:<size>, an existing local folder, or a hub id like 'org/name'")
DATA_REF = RefUse("data", ("world", "file", "hub"), WORLD_CORPORA, "corpus",
                  f"must be world:<corpus>, a local {DATA_FILE_WORDS}, or a hub dataset id")
CORPUS_REF = dataclasses.replace(DATA_REF, name="corpus", kinds=("world", "file", "folder", "glob", "hub"))


@dataclass(frozen=True)
class Ref:
    """A parsed reference: the text as written, its kind, and the parts that kind has."""

    text: str
    kind: RefKind
    world: str | None = None  # the size or corpus after `world:`
    path: Path | None = None  # a local file, folder or glob pattern (with ~ expanded)
    hub_id: str | None = None
    registry_name: str | None = None  # models:/<name>@<alias> or models:/<name>/<version>
    alias: str | None = None
    version: int | None = None
    field: str | None = dataclasses.field(default=None, compare=False)  # the config field it came from

    def __str__(self) -> str:
        return self.text


def is_local_path(text: str) -> bool:
    """A reference is a local path when it says so (absolute, ./, ../, ~) or exists."""
    return text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().exists()


# --- parsing -------------------------------------------------------------------------------------


def _kind(text: str, use: RefUse, strict: bool) -> RefKind:
    """Which kind `text` is for `use`; a strict parse sees only the kinds the field accepts."""
    if text.startswith(WORLD_PREFIX):
        return "world"
    if text.startswith(REGISTRY_PREFIX) and (not strict or "registry" in use.kinds):
        return "registry"
    path = Path(text).expanduser()
    if use.name == "corpus" and has_magic(text):
        return "glob"
    if use.name == "corpus" and path.is_dir():
        return "folder"
    if use.name == "model":
        return "folder" if is_local_path(text) else "hub"
    if text.endswith(DATA_FILE_SUFFIXES) or is_local_path(text):
        return "folder" if not strict and path.is_dir() else "file"
    return "hub"


def _check(ref: Ref, use: RefUse) -> None:
    """The config's checks of one reference, as the ValueError pydantic turns into `field: message (got ...)`."""
    path = ref.path
    if ref.kind == "world" and ref.world not in use.world_names:
        raise ValueError(f"unknown tiny-world {use.world_what} '{ref.world}'; use one of {', '.join(use.world_names)}")
    if ref.kind == "glob" and not any(Path(p).is_file() for p in glob(str(path), recursive=True)):
        raise ValueError("the glob matches no file; fix the pattern")
    if ref.kind == "folder" and use.name == "model" and not path.is_dir():
        raise ValueError("local model folder does not exist; build it or fix the path")
    if ref.kind == "file" and not path.is_file():
        raise ValueError("local data file does not exist; fix the path")
    if ref.kind == "file" and not ref.text.endswith(DATA_FILE_SUFFIXES):
        raise ValueError(f"local data must be a {DATA_FILE_WORDS}")
    if ref.kind == "registry" and ref.registry_name is None:
        raise ValueError("a registry reference is models:/<name>@<alias> or models:/<name>/<version>")
    if ref.kind == "hub" and not _HUB_ID_RE.match(ref.text):
        raise ValueError(use.wording)


def _registry_parts(text: str) -> dict:
    found = _REGISTRY_RE.match(text)
    if found is None:
        return {}
    version = found["version"]
    return {"registry_name": found["name"], "alias": found["alias"], "version": int(version) if version else None}


def parse_ref(text: str, field: str | None = None, allowed: RefUse = MODEL_REF, strict: bool = True) -> Ref:
    """`text` as a typed reference for a field that takes `allowed`.

    Strict (the config's validators): raises ValueError with the sentence the config reports when the
    reference is not one the field takes, names an unknown world size or corpus, or a local path that is
    not there. Not strict (values already validated, or an option): only says what kind the text is.
    """
    text = text.strip()
    kind = _kind(text, allowed, strict)
    parts: dict = {}
    if kind == "world":
        parts["world"] = text.removeprefix(WORLD_PREFIX)
    elif kind in ("file", "folder", "glob"):
        parts["path"] = Path(text).expanduser()
    elif kind == "hub":
        parts["hub_id"] = text
    else:
        parts.update(_registry_parts(text))
    ref = Ref(text, kind, field=field, **parts)
    if strict:
        _check(ref, allowed)
    return ref


def as_ref(ref: Ref | str, allowed: RefUse = MODEL_REF, field: str | None = None) -> Ref:
    """A Ref as it is; text parsed (not strictly) for a field that takes `allowed`."""
    return ref if isinstance(ref, Ref) else parse_ref(ref, field, allowed, strict=False)


# --- the tiny world's address book --------------------------------------------------------------------


@dataclass
class WorldPaths:
    """Where one world (seed + settings) and one base size of it live."""

    root: Path
    size: str
    base: Path

    @property
    def corpora(self) -> Path:
        return self.root / "corpora"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def corpus(self, name: str) -> Path:
        return self.corpora / f"{name}.jsonl"


def world_data_fields(w: WorldConfig) -> dict:
    """The world settings that shape its corpora (they name the world's folder)."""
    return w.model_dump(include={"pretrain_docs", "midtrain_docs", "sft_pairs", "dpo_pairs", "rl_prompts",
                                 "eval_per_level"})


def world_train_fields(w: WorldConfig) -> dict:
    """The world settings that shape its pre-trained base (they name the base's folder)."""
    return w.model_dump(include={"pretrain_tokens", "pretrain_lr", "pretrain_batch_size", "seq_len"})


def world_size(cfg: FlywheelConfig) -> str:
    """The size named by `model.source: world:<size>` (nano when the base is not from the world)."""
    ref = as_ref(cfg.model.source)
    return ref.world if ref.kind == "world" else "nano"


def world_paths(cfg: FlywheelConfig, size: str | None = None) -> WorldPaths:
    """A config's world folders, without building anything."""
    size = size or world_size(cfg)
    data_key = fingerprint(WORLD_VERSION, cfg.seed, world_data_fields(cfg.world))
    root = cfg.home / "world" / f"s{cfg.seed}-{data_key}"
    base_key = fingerprint(WORLD_VERSION, cfg.seed, size, world_train_fields(cfg.world))
    return WorldPaths(root=root, size=size, base=root / f"base-{size}-{base_key}")


def resolve_world_ref(cfg: FlywheelConfig, ref: Ref | str) -> Path:
    """`world:<size>` or `world:<corpus>` as the built path, or the sentence that says to build the world first."""
    text = str(ref)
    name = ref.world if isinstance(ref, Ref) and ref.world is not None else text.removeprefix(WORLD_PREFIX)
    paths = world_paths(cfg, name if name in WORLD_SIZES else None)
    target = paths.base if name in WORLD_SIZES else paths.corpus(name)
    if not target.exists():
        raise FlywheelError(f"{text}: the tiny world is not built at {paths.root}; run `flywheel world build CONFIG` "
                            "first")
    return target


# --- resolution -------------------------------------------------------------------------------------


def _at(ref: Ref) -> str:
    """`field: ` for an error about a reference, or nothing when it came from no config field."""
    return f"{ref.field}: " if ref.field else ""


def _not_here(ref: Ref) -> FlywheelError:
    return FlywheelError(f"{_at(ref)}{ref.text}: a model-registry reference is not read here; download that version "
                         f"first (mlflow.artifacts.download_artifacts(\"{ref.text}\")) and point at its folder")


def local_path(cfg: FlywheelConfig, ref: Ref) -> Path | None:
    """The local file, folder or glob pattern a reference names (a world one built first); None for a hub id."""
    if ref.kind == "world":
        return resolve_world_ref(cfg, ref)
    if ref.kind == "registry":
        raise _not_here(ref)
    return ref.path


def model_location(cfg: FlywheelConfig, ref: Ref | str) -> str:
    """A model reference as `from_pretrained` takes it: the local folder (world ones built first), else the hub id."""
    ref = as_ref(ref)
    path = local_path(cfg, ref)
    if path is None or not path.exists():
        return ref.text
    return str(path if ref.kind == "world" else path.resolve())


def _folder_files(ref: Ref) -> list[Path]:
    """Every data file under a folder, nested subfolders included (Dolma's layout). Other files are skipped, but
    JSON lines behind a compression this reader does not know are kept, so reading one (unless the source's
    exclude drops it) names the compression rather than leaving the file out unsaid."""
    files = sorted(p for p in ref.path.rglob("*")
                   if p.is_file() and (p.name.endswith(DATA_FILE_SUFFIXES) or looks_like_compressed(p)))
    if not files:
        raise FlywheelError(f"{_at(ref)}the folder {ref.text} holds no {DATA_FILE_WORDS}; "
                            "point it at the folder with the data")
    return files


def _glob_files(ref: Ref) -> list[Path]:
    files = sorted(Path(p) for p in glob(str(ref.path), recursive=True) if Path(p).is_file())
    if not files:
        raise FlywheelError(f"{_at(ref)}the glob {ref.text} matches no file; fix the pattern")
    bad = [p for p in files if not p.name.endswith(DATA_FILE_SUFFIXES)]
    if bad:
        raise FlywheelError(f"{_at(ref)}the glob {ref.text} matches {bad[0]}, which is not a "
                            f"{DATA_FILE_WORDS}; narrow the pattern")
    return files


def data_files(cfg: FlywheelConfig, ref: Ref | str) -> list[Path] | None:
    """The local files of a data reference, sorted (the same on every machine); None for a hub dataset.

    A folder gives every data file under it, a glob every file it matches; errors name `ref.field`.
    """
    ref = as_ref(ref, CORPUS_REF)
    if ref.kind == "folder":
        return _folder_files(ref)
    if ref.kind == "glob":
        return _glob_files(ref)
    path = local_path(cfg, ref)
    if path is not None and ref.kind == "file" and not path.is_file():
        raise FlywheelError(f"{_at(ref)}{path} is not a data file; fix the path")
    return None if path is None else [path]

"""Loading models and tokenizers safely, and naming them by content for cache keys."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import CHAT_TEMPLATES, FlywheelConfig
from flywheel.errors import FlywheelError
from flywheel.hub import check_hub_access, hub_failure
from flywheel.refs import as_ref, model_location

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}
CHAT_TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config keys that different architectures use for the longest sequence their positions cover.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _field_of(cfg: FlywheelConfig, ref: str) -> str | None:
    """The config field a model reference came from ("midtrain.reference"), to name it in an error."""
    fields = (("midtrain.reference", cfg.midtrain.reference), ("model.tokenizer", cfg.model.tokenizer),
              ("model.source", cfg.model.source))
    target = Path(model_location(cfg, ref)) if as_ref(ref).kind != "world" else None
    for field, value in fields:
        if value is None:
            continue
        if value == ref or (target is not None and _is_local(value) and Path(value).expanduser().resolve() == target):
            return field
    return None


def _say(field: str | None, subject: str, rest: str) -> FlywheelError:
    """`field: subject rest`, or `subject: rest` when the reference came from no config field."""
    return FlywheelError(f"{field}: {subject} {rest}" if field else f"{subject}: {rest}")


def _is_local(ref: str) -> bool:
    return as_ref(ref).kind == "folder"


def _hub_failure(cfg: FlywheelConfig, ref: str, exc: BaseException) -> FlywheelError | None:
    """The hub's one sentence for a failed load of a hub id; None for a local or world reference."""
    return hub_failure(_field_of(cfg, ref), ref, exc) if as_ref(ref).kind == "hub" else None


def _folder_problems(path: Path) -> dict[str, str]:
    """What a local model folder lacks: config, weights, tokenizer (each with the words to say it)."""
    problems = {}
    if not (path / "config.json").is_file():
        problems["config"] = "no config.json"
    if not (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
        problems["weights"] = "no safetensors weights"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems["tokenizer"] = "no tokenizer files"
    return problems


def check_model_folder(cfg: FlywheelConfig, ref: str, needs: tuple[str, ...] = ("config", "weights")) -> None:
    """Fail with one sentence when a local `ref` is not a saved HF checkpoint (hub ids are left to the hub).

    `needs` is any of "config", "weights", "tokenizer": what the caller is about to load.
    """
    if as_ref(ref).kind == "world":
        return  # model_location already says "build the world first"
    field = _field_of(cfg, ref)
    path = Path(model_location(cfg, ref))
    if not path.exists():
        if _is_local(ref):
            raise _say(field, ref, "does not exist; point it at a saved HF checkpoint folder")
        check_hub_access(field, ref)  # a hub id: reachable, or one sentence now
        return
    if not path.is_dir():
        raise _say(field, str(path), "is a file, not a model folder; point it at a saved HF checkpoint folder")
    problems = _folder_problems(path)
    if any(need in problems for need in needs):
        said = ", ".join(problems.values())
        raise _say(field, str(path), f"is not a model folder ({said}); point it at a saved HF checkpoint "
                                     "(the folder save_pretrained writes)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class Precision:
    """What a training stage keeps, computes in and publishes (flywheel-midtrain.json / -posttrain.json)."""

    mode: str  # model.precision: mixed or pure
    master: str  # the trained parameters and AdamW's state
    compute: str  # forward and backward (autocast when below `master`)
    published: str  # the weights written for the next stage and for inference

    def record(self) -> dict[str, str]:
        return {"precision": self.mode, "master_dtype": self.master, "compute_dtype": self.compute,
                "published_dtype": self.published}


LOW_PRECISION = ("bfloat16", "float16")
PURE_WARNING = ("warning: model.precision: pure trains the {dtype} weights and AdamW's state as they are: an update "
                "under ~1/256 of a weight rounds away (most of a decaying anneal's tail); use mixed unless you "
                "measured otherwise")


def _stored_dtype(location: str) -> str:
    """The dtype a checkpoint's config.json says its weights are in (what model.dtype: auto loads); float32 else."""
    try:
        conf = json.loads((Path(location) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    found = conf.get("dtype") or conf.get("torch_dtype") if isinstance(conf, dict) else None
    return found if found in ("float32", *LOW_PRECISION) else "float32"


def precision_of(cfg: FlywheelConfig, ref: str | None = None) -> Precision:
    """The precision policy for training `ref` (model.dtype, model.precision, and what this device can do).

    mixed (the default): float32 master weights and optimizer state; compute in model.dtype by autocast on a
    GPU that supports it (on a CPU in float32: its bf16 is emulated, slow); published in model.dtype. pure:
    everything in model.dtype, as loaded.
    """
    import torch

    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else _stored_dtype(model_location(cfg, ref or
                                                                                            cfg.model.source))
    if cfg.model.precision == "pure":
        return Precision("pure", dtype, dtype, dtype)
    gpu = torch.cuda.is_available() and (dtype != "bfloat16" or torch.cuda.is_bf16_supported())
    return Precision("mixed", "float32", dtype if dtype in LOW_PRECISION and gpu else "float32", dtype)


def check_attention(cfg: FlywheelConfig) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU: one sentence before any load when not here."""
    import importlib.util

    import torch

    if cfg.model.attn_implementation != "flash_attention_2":
        return
    missing = "the flash-attn package (pip install flash-attn)" if importlib.util.find_spec("flash_attn") is None \
        else None if torch.cuda.is_available() else "a CUDA GPU"
    if missing:
        raise FlywheelError(f"model.attn_implementation: flash_attention_2 needs {missing}, which this machine lacks; "
                            "use sdpa")


def load_model(cfg: FlywheelConfig, ref: str, for_training: bool = True):
    """AutoModelForCausalLM from safetensors only, remote code only if the config allows it.

    For training, in the precision policy's master dtype (float32 unless model.precision: pure); to infer,
    in model.dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_model_folder(cfg, ref, ("config", "weights"))
    check_attention(cfg)
    dtype = _DTYPES[cfg.model.dtype]
    if for_training:
        dtype = precision_of(cfg, ref).master
        if cfg.model.precision == "pure" and dtype in LOW_PRECISION:
            print(PURE_WARNING.format(dtype=dtype), file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_location(cfg, ref),
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
            attn_implementation=cfg.model.attn_implementation,
        )
    except Exception as exc:  # transformers: missing files, unknown model_type, no remote code; the hub's failures
        failure = _hub_failure(cfg, ref, exc)
        if failure is not None:
            raise failure from None
        if not isinstance(exc, (OSError, ValueError, KeyError)) or (isinstance(exc, OSError) and exc.errno is not None):
            raise  # a disk or permission problem, worded by the CLI
        raise _say(_field_of(cfg, ref), ref, f"could not be loaded as a safetensors causal LM ({_first_line(exc)}); "
                   "point it at a saved HF checkpoint") from None
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model


def load_tokenizer(cfg: FlywheelConfig, ref: str | None = None):
    """The tokenizer of `ref` (default: model.tokenizer, else the base model's folder)."""
    from transformers import AutoTokenizer

    ref = ref or cfg.model.tokenizer or cfg.model.source
    check_model_folder(cfg, ref, ("tokenizer",))
    try:
        tok = AutoTokenizer.from_pretrained(model_location(cfg, ref), trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is one of the worded kinds
        failure = _hub_failure(cfg, ref, exc)
        if failure is not None:
            raise failure from None
        if not isinstance(exc, (OSError, ValueError, KeyError, TypeError)) or (
                isinstance(exc, OSError) and exc.errno is not None):
            raise
        raise _say(_field_of(cfg, ref), ref, f"has no tokenizer that loads ({_first_line(exc)}); point it at a "
                   "folder with the tokenizer files save_pretrained writes") from None
    if tok.eos_token_id is None:
        raise FlywheelError(f"{ref}: the tokenizer has no eos token; packing needs one to separate documents")
    if cfg.posttrain.chat_template:
        tok.chat_template = chat_template_text(cfg)
    return tok


def chat_template_text(cfg: FlywheelConfig) -> str:
    """posttrain.chat_template as Jinja text: a bundled template by name, or the user's .jinja file."""
    name = cfg.posttrain.chat_template or ""
    path = CHAT_TEMPLATES_DIR / f"{name}.jinja" if name in CHAT_TEMPLATES else Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FlywheelError(f"posttrain.chat_template: cannot read {path} ({exc.strerror}); point it at a .jinja "
                            f"file or use a bundled template ({', '.join(CHAT_TEMPLATES)})") from None


def _positions(model_path: str | Path) -> tuple[str, int] | None:
    """(config key, value) for the longest sequence a local checkpoint's positions cover; None when unknown."""
    try:
        conf = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(conf, dict):
        return None
    for section in (conf, conf.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None


def max_positions(model_path: str | Path) -> int | None:
    """The longest sequence a local checkpoint's position embeddings cover, from its config.json (None: unknown)."""
    found = _positions(model_path)
    return found[1] if found else None


def check_seq_len(cfg: FlywheelConfig, model_path: str | Path, field: str | None = "model.source") -> None:
    """Before any training: `midtrain.seq_len` must fit the model's positions, or training would run past them.

    Only local checkpoints are checked (a hub id's config is not fetched here); `field` names the model.
    """
    found = _positions(model_path)
    seq_len = cfg.midtrain.seq_len
    if found is not None and seq_len > found[1]:
        key, limit = found
        who = f"{field} ({model_path})" if field else str(model_path)
        raise FlywheelError(f"midtrain.seq_len: {seq_len} is longer than the {limit} positions {who} has ({key} in "
                            f"its config.json); set midtrain.seq_len to at most {limit}")


def check_midtrain_models(cfg: FlywheelConfig, base: str, reference: str | None) -> None:
    """Before any work: the base (and the reference, when the objective reads one) are model folders whose
    positions cover `midtrain.seq_len`; each problem is one sentence naming the field."""
    for ref, default in ((base, "the base"), (reference, "the reference")):
        if ref is None:
            continue
        check_model_folder(cfg, ref, ("config", "weights"))
        check_seq_len(cfg, model_location(cfg, ref), _field_of(cfg, ref) or default)


def model_identity(path_or_id: str) -> str:
    """Content hash of a local checkpoint's weights and config; hub ids hash by name (pin a revision)."""
    path = Path(path_or_id)
    if not path.is_dir():
        return hashlib.sha256(f"hub:{path_or_id}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    for f in files:
        if f.exists():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def tokenizer_identity(tok) -> str:
    """Hash of the vocabulary and special tokens: equal ids mean equal meaning."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = repr((vocab, tok.eos_token, tok.bos_token, tok.pad_token)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same_vocabulary(base_tok, ref_tok, base_name: str, ref_name: str) -> None:
    """ReMiT compares log-probs token by token, so both models must share one vocabulary."""
    if tokenizer_identity(base_tok) == tokenizer_identity(ref_tok):
        return
    base_inv = {i: t for t, i in base_tok.get_vocab().items()}
    ref_inv = {i: t for t, i in ref_tok.get_vocab().items()}
    for i in range(max(len(base_inv), len(ref_inv))):
        a, b = base_inv.get(i), ref_inv.get(i)
        if a != b:
            raise FlywheelError(
                f"the base ({base_name}) and the reference ({ref_name}) have different vocabularies: token id {i} "
                f"is {a!r} in the base but {b!r} in the reference; ReMiT needs a reference with the base's tokenizer"
            )
    raise FlywheelError(
        f"the base ({base_name}) and the reference ({ref_name}) differ in their special tokens; use the same tokenizer"
    )

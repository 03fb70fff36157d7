"""Loading models and tokenizers safely, and naming them by content for cache keys."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flywheel.config import FlywheelConfig
from flywheel.errors import FlywheelError

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


def resolve_model(cfg: FlywheelConfig, ref: str) -> str:
    """A model reference as `from_pretrained` takes it: a local folder for world:/paths, else the hub id."""
    if ref.startswith("world:"):
        from flywheel.world.build import resolve_world_ref

        return str(resolve_world_ref(cfg, ref))
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def load_model(cfg: FlywheelConfig, ref: str, for_training: bool = True):
    """AutoModelForCausalLM from safetensors only, remote code only if the config allows it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[cfg.model.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(cfg, ref),
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
        )
    except OSError as exc:
        raise FlywheelError(f"{ref}: could not load a safetensors model ({str(exc).splitlines()[0]})") from None
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model


def load_tokenizer(cfg: FlywheelConfig, ref: str | None = None):
    """The tokenizer of `ref` (default: model.tokenizer, else the base model's folder)."""
    from transformers import AutoTokenizer

    ref = ref or cfg.model.tokenizer or cfg.model.source
    tok = AutoTokenizer.from_pretrained(resolve_model(cfg, ref), trust_remote_code=cfg.model.trust_remote_code)
    if tok.eos_token_id is None:
        raise FlywheelError(f"{ref}: the tokenizer has no eos token; packing needs one to separate documents")
    return tok


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

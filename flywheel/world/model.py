"""The tiny world's model sizes: small Llamas that learn arithmetic on a CPU in minutes."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# hidden, layers, heads, ffn. nano ≈ 1M, micro ≈ 2-3M, mini ≈ 10M parameters (vocab 512, tied embeddings).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "nano": (128, 4, 4, 512),
    "micro": (192, 6, 6, 576),
    "mini": (256, 10, 8, 1024),
}


def llama_config(size: str, tok: PreTrainedTokenizerBase, max_positions: int = 512) -> LlamaConfig:
    """A LlamaConfig of a named size whose special-token ids match the tokenizer."""
    hidden, layers, heads, ffn = SIZES[size]
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def new_model(size: str, tok: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; seeded so a world build is reproducible."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size, tok))


# Architecture classes the real-model configs use, in tiny random form, so the code path of
# OLMo-2 and SmolLM3 runs here without the hub.
TINY_ARCHITECTURES = ("llama", "olmo2", "smollm3")


def tiny_random_model(arch: str, tok: PreTrainedTokenizerBase, seed: int = 0, hidden: int = 64, layers: int = 2,
                      vocab_size: int | None = None):
    """A randomly initialised model of a real architecture class, sized for tests.

    `vocab_size` (default: the tokenizer's) lets a test use the real family's output layer, e.g. OLMo-2's 100,352.
    """
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    common = dict(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "olmo2":
        return Olmo2ForCausalLM(Olmo2Config(**common))
    if arch == "smollm3":
        return SmolLM3ForCausalLM(SmolLM3Config(**common))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    raise ValueError(f"arch must be one of {TINY_ARCHITECTURES}")

"""Local stand-ins for what the paper configs read from the hub, in the real formats and schemas.

- models: a folder per hub model holding its real architecture's config.json (OLMo 2 1B at vocabulary 100,352,
  SmolLM3 3B at 128,256; no weights: a rehearsal initialises its own) and a tokenizer whose chat template is
  written the way the real one is (OLMo 2's Tulu turns, SmolLM3's ChatML turns), without {% generation %} marks;
- allenai/dolmino-mix-1124: Dolmino's folders of .json.zst / .json.gz shards with Dolma's fields;
- allenai/tulu-3-sft-mixture: `id`, `messages` (system, user and assistant turns), `source`;
- allenai/olmo-2-0425-1b-preference-mix: `chosen` and `rejected` as whole conversations, no `prompt`;
- openai/gsm8k: `question`, and `answer` as worked lines ending `#### n`.

`local_config` rewrites a config's hub ids as these paths, the way a user points a config at downloaded copies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .test_dolma_sources import _write_dolmino

# A conversation format in OLMo 2's way (Tulu turns) and one in SmolLM3's (ChatML), as their tokenizers carry
# them: no {% generation %} marks.
TULU_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
CHATML_STYLE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

MODELS = {
    # allenai/OLMo-2-0425-1B (and its -Instruct): Olmo2ForCausalLM, its config.json's shape
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "vocab_size": 100352,
              "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 16, "max_position_embeddings": 4096, "rope_theta": 500000,
              "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu",
              "attention_bias": False, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 0},
    # HuggingFaceTB/SmolLM3-3B-Base (and SmolLM3-3B): SmolLM3ForCausalLM, every 4th layer without RoPE
    "smollm3": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "vocab_size": 128256,
                "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 65536,
                "rope_theta": 5000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
                "hidden_act": "silu", "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)],
                "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 0},
}
TOKENS = {"olmo2": ("<|endoftext|>", "<|pad|>", TULU_STYLE), "smollm3": ("<|im_end|>", "<|finetune_right_pad|>",
                                                                          CHATML_STYLE)}


def tokenizer(family: str, template: str | None):
    """A real fast byte-level BPE tokenizer (trained in milliseconds) with the family's eos, pad and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos, pad, _ = TOKENS[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["Natalia sold 48 clips in April, and half as many in May. How many clips did she sell? #### 72",
              "the model reads tokens from compressed shards while an anneal mixes maths prose code answers"]
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=600, special_tokens=[eos, pad],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad)
    if template is not None:
        tok.chat_template = template
    return tok


def write_model(folder: Path, family: str, template: str | None = "as the family") -> Path:
    """config.json of the real architecture and a tokenizer; `template` None: a tokenizer with no chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODELS[family], indent=1))
    tokenizer(family, TOKENS[family][2] if template == "as the family" else template).save_pretrained(folder)
    return folder


def _problem(i: int) -> tuple[str, str]:
    a, b = 3 + i % 17, 2 + i % 5
    return (f"Tom has {a} boxes with {b} pens in each. How many pens does Tom have?",
            f"Tom has {a} boxes of {b} pens.\n{a} * {b} = <<{a}*{b}={a * b}>>{a * b}\n#### {a * b}")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tulu(path: Path, n: int = 40) -> Path:
    rows = []
    for i in range(n):
        q, a = _problem(i)
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            turns.insert(0, {"role": "system", "content": "You are a careful assistant."})
        rows.append({"id": f"tulu_standin_{i}", "messages": turns, "source": "ai2-adapt-dev/standin"})
    return _jsonl(path, rows)


def write_preferences(path: Path, n: int = 40, drop: str | None = None) -> Path:
    """Preference pairs as whole conversations sharing their user turn (no `prompt` column); `drop`: a column."""
    rows = []
    for i in range(n):
        q, a = _problem(i)
        wrong = a.rsplit("####", 1)[0] + f"#### {int(a.rsplit(' ', 1)[1]) + 1}"
        row = {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
               "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": wrong}],
               "chosen_rating": 5.0, "rejected_rating": 2.0, "chosen_model": "a", "rejected_model": "b",
               "source": "standin", "id": f"pref_{i}"}
        row.pop(drop, None)
        rows.append(row)
    return _jsonl(path, rows)


def write_gsm8k(path: Path, n: int = 40) -> Path:
    return _jsonl(path, [dict(zip(("question", "answer"), _problem(i), strict=True)) for i in range(n)])


def write_all(root: Path) -> dict[str, Path]:
    """Every stand-in under `root`, keyed by the hub id it stands in for."""
    _write_dolmino(root / "dolmino")
    return {"allenai/OLMo-2-0425-1B-Instruct": write_model(root / "olmo2-instruct", "olmo2"),
            "allenai/OLMo-2-0425-1B": write_model(root / "olmo2-base", "olmo2"),
            "HuggingFaceTB/SmolLM3-3B-Base": write_model(root / "smollm3-base", "smollm3"),
            "HuggingFaceTB/SmolLM3-3B": write_model(root / "smollm3", "smollm3"),
            "allenai/dolmino-mix-1124": root / "dolmino",
            "allenai/tulu-3-sft-mixture": write_tulu(root / "tulu-3-sft-mixture.jsonl"),
            "allenai/olmo-2-0425-1b-preference-mix": write_preferences(root / "preference-mix.jsonl"),
            "openai/gsm8k": write_gsm8k(root / "gsm8k.jsonl")}


def local_config(config: Path, paths: dict[str, Path], out: Path, home: Path) -> Path:
    """`config` with every hub id in `paths` replaced by its local copy (longest ids first), the hub revisions
    removed (a local copy is one version), and `home` set: what a user does to run it offline."""
    text = config.read_text()
    for hub_id in sorted(paths, key=len, reverse=True):
        text = re.sub(rf"(?<![\w/-]){re.escape(hub_id)}(?![\w-])", str(paths[hub_id]), text)
    text = re.sub(r"^\s*revision:.*\n", "", text, flags=re.M)
    out.write_text(f"home: {home}\n" + text)
    return out

"""The tiny world build: real corpora, a real tokenizer and a real pre-trained base, offline."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.data.io import read_jsonl
from flywheel.world.build import build_world, heldout_loss, world_paths
from flywheel.world.tasks import is_heldout

from .conftest import SMALL_WORLD, small_config


def test_base_loads_with_from_pretrained_as_safetensors(small_world):
    _, report = small_world
    base = report.paths.base
    assert (base / "model.safetensors").exists()
    assert not list(base.glob("*.bin")), "pickled weights must never be written"
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id


def test_pretrained_base_beats_a_fresh_model_on_heldout_text(small_world):
    _, report = small_world
    trained = heldout_loss(report.paths.base, report.paths)
    fresh = heldout_loss(None, report.paths)
    assert trained < fresh - 1.0, (trained, fresh)


def test_tokenizer_round_trips_and_splits_digits(small_world):
    _, report = small_world
    tok = AutoTokenizer.from_pretrained(report.paths.tokenizer)
    text = "Ann has 123 apples. She buys 45 more.\n123 + 45 = 168\n#### 168"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("9081", add_special_tokens=False)["input_ids"])
    assert pieces == ["9", "0", "8", "1"]
    assert tok.padding_side == "left"
    assert {tok.bos_token, tok.eos_token, tok.pad_token} == {"<|bos|>", "<|eos|>", "<|pad|>"}


def test_chat_template_marks_only_the_assistant_reply_for_training(small_world):
    _, report = small_world
    tok = AutoTokenizer.from_pretrained(report.paths.tokenizer)
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "2 + 3 = 5\n#### 5<|eos|>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|user|>What is 2 + 3?<|end|>\n<|assistant|>"


def test_eval_splits_are_disjoint_from_every_training_corpus(small_world):
    _, report = small_world
    p = report.paths
    evals = read_jsonl(p.corpus("eval"))
    assert evals and all(is_heldout(r["id"]) for r in evals)
    eval_ids = {r["id"] for r in evals}
    eval_questions = {r["question"] for r in evals}
    for name in ("sft", "dpo", "rl"):
        rows = read_jsonl(p.corpus(name))
        assert not eval_ids & {r["id"] for r in rows}, name
        assert not eval_questions & {r["prompt"] for r in rows}, name
    for name in ("pretrain", "midtrain"):
        first_lines = {r["text"].split("\n", 1)[0] for r in read_jsonl(p.corpus(name))}
        assert not eval_questions & first_lines, name
    mc = read_jsonl(p.corpus("eval_mc"))
    assert {r["id"] for r in mc} == eval_ids
    assert all(r["choices"][r["label"]] == r["answer"] for r in mc)


def test_rebuild_with_same_seed_reuses_and_other_seed_builds_anew(small_world, world_home):
    cfg, report = small_world
    again = build_world(cfg, ladder=False)
    assert again.reused_corpora and again.reused_base
    assert again.paths == report.paths
    other = world_paths(small_config(world_home, seed=1))
    assert other.root != report.paths.root and other.base != report.paths.base
    assert world_paths(cfg, "micro").base != report.paths.base
    assert world_paths(cfg, "micro").root == report.paths.root  # corpora are shared between sizes


def test_world_build_is_deterministic_for_a_seed(small_world, tmp_path):
    """Same seed, fresh home: identical corpora bytes (the base differs only by float nondeterminism)."""
    from flywheel.world.corpora import write_corpora

    cfg, report = small_world
    counts = write_corpora(tmp_path, cfg.world, cfg.seed)
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == report.paths.corpus(name).read_bytes(), name


def test_build_writes_a_manifest_of_what_it_made(small_world):
    _, report = small_world
    manifest = json.loads((report.paths.base / "flywheel-base.json").read_text())
    assert manifest["size"] == "nano" and manifest["params"] == report.params > 500_000
    assert torch.isfinite(torch.tensor(manifest["train_loss"]))


def test_a_sigterm_during_the_base_pre_training_leaves_no_half_built_folder(tmp_path):
    """A world build stopped by SIGTERM (a scheduler's stop) unwinds: exit 143, the base's temporary folder gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    world = {**SMALL_WORLD, "pretrain_tokens": 50_000_000}  # far more than the test waits for
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "test", "seed": 0, "home": str(tmp_path / "home"), "world": world}))
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "world", "build", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "home").glob("world/*/.base-*.tmp")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        assert list((tmp_path / "home").glob("world/*/.base-*.tmp")), "pre-training never started"
        time.sleep(3)  # inside the Trainer's steps
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    world_dir = next((tmp_path / "home" / "world").iterdir())
    assert not list(world_dir.glob(".base-*")), "the half-built base's temporary folder was left behind"
    assert not list(world_dir.glob("base-*")), "nothing was published"
    assert (world_dir / "world.json").exists()  # the finished corpora and tokenizer stay for the next build

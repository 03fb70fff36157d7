"""The mid-training engine end to end on the tiny world: scoring cache, trainer, stage, DDP."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from flywheel.data.io import read_jsonl
from flywheel.data.mixture import build_mixture
from flywheel.errors import FlywheelError
from flywheel.models import tokenizer_identity
from flywheel.remit.midtrain import midtrain
from flywheel.remit.scoring import (
    cache_key,
    open_cache,
    reference_logprobs,
    score_reference,
    storage_error_bound,
)
from flywheel.remit.trainer import PackedDataset, ReMiTTrainer

from .conftest import small_config

REPO = Path(__file__).resolve().parents[1]
MIDTRAIN = {"token_budget": 16_384, "seq_len": 128, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1}


def mt_config(home, **midtrain):
    return small_config(home, midtrain={**MIDTRAIN, **midtrain})


@pytest.fixture(scope="session")
def reference(small_world):
    """A reference that differs from the base: the base after a short NTP anneal (a real mid-trained model)."""
    cfg, _ = small_world
    return str(midtrain(mt_config(cfg.home, objective="ntp")).checkpoint)


def heldout_eval_loss(model_dir: Path | str, cfg) -> float:
    """Mean next-token loss on held-out evaluation problems (never in any training corpus)."""
    from flywheel.refs import world_paths

    paths = world_paths(cfg)
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    texts = [r["question"] + "\n" + r["solution"] for r in read_jsonl(paths.corpus("eval"))]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.inference_mode():
        return float(model(**enc, labels=labels).loss)


def _trainer(cfg, tmp_path, objective="remit", reference_model=None):
    from flywheel.models import load_model

    model = load_model(cfg, cfg.model.source)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    return ReMiTTrainer(model=model, args=args, objective=objective, reference_model=reference_model)


def _batch(cfg, rows=4):
    from flywheel.models import load_tokenizer

    tok = load_tokenizer(cfg)
    packed = build_mixture(cfg, tok, tokenizer_identity(tok)).load()
    items = [PackedDataset(packed)[i] for i in range(rows)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def test_cached_float32_and_online_reference_give_the_same_loss_and_gradients(small_world, reference, tmp_path):
    cfg, _ = small_world
    ref_model = AutoModelForCausalLM.from_pretrained(reference).eval()
    batch = _batch(cfg)
    online = _trainer(cfg, tmp_path, reference_model=ref_model)
    loss_online, grads_online = _loss_and_grads(online, batch)
    with torch.no_grad():
        cached_batch = {**batch, "ref_logprobs": reference_logprobs(ref_model, batch["input_ids"]).float()}
    cached = _trainer(cfg, tmp_path)
    loss_cached, grads_cached = _loss_and_grads(cached, cached_batch)
    assert abs(float(loss_online) - float(loss_cached)) < 1e-5
    for a, b in zip(grads_online, grads_cached, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_float16_storage_error_stays_within_the_derived_bound(small_world, reference, tmp_path):
    """float16 was chosen over bfloat16: same 2 bytes, 8x smaller rounding error on log-probs."""
    cfg, _ = small_world
    ref_model = AutoModelForCausalLM.from_pretrained(reference).eval()
    batch = _batch(cfg)
    with torch.no_grad():
        exact = reference_logprobs(ref_model, batch["input_ids"]).float()
    trainer = _trainer(cfg, tmp_path)
    with torch.no_grad():
        loss_exact = float(trainer.compute_loss(trainer.model, {**batch, "ref_logprobs": exact}))
        out = trainer.model(input_ids=batch["input_ids"])
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    errors = {}
    for dtype in ("float16", "bfloat16"):
        stored = exact.to(getattr(torch, dtype)).float()
        with torch.no_grad():
            loss = float(trainer.compute_loss(trainer.model, {**batch, "ref_logprobs": stored}))
        errors[dtype] = abs(loss - loss_exact)
        assert errors[dtype] <= storage_error_bound(exact[:, 1:], float(nll), dtype) + 1e-7, dtype
    assert errors["float16"] < errors["bfloat16"]


def test_score_reference_stores_16bit_logprobs_aligned_to_the_tokens(small_world, reference):
    cfg = mt_config(small_world[0].home, reference=reference)
    rep = score_reference(cfg, reference)
    packed = rep.corpus.load()
    chunk = rep.cache.chunks[0]
    assert chunk.dtype == np.float16 and chunk.itemsize == 2
    assert sum(len(c) for c in rep.cache.chunks) == len(packed)
    ref_model = AutoModelForCausalLM.from_pretrained(reference).eval()
    ids = torch.from_numpy(np.asarray(packed.input_ids[:2], dtype=np.int64))
    with torch.no_grad():
        exact = reference_logprobs(ref_model, ids)
    stored = torch.from_numpy(np.stack([rep.cache.rows(0), rep.cache.rows(1)]).astype(np.float32))
    assert torch.allclose(stored, exact, rtol=2**-10, atol=1e-6)
    assert (stored[:, 0] == 0).all()
    again = score_reference(cfg, reference)
    assert again.computed_chunks == [] and again.cache.folder == rep.cache.folder


def test_cache_key_changes_when_any_input_changes(small_world, reference):
    cfg, report = small_world
    base_key = cache_key(cfg, reference, "tok-a", "corpus-a")
    variants = [
        cache_key(cfg, str(report.paths.base), "tok-a", "corpus-a"),  # other reference weights
        cache_key(cfg, reference, "tok-b", "corpus-a"),  # other tokenizer
        cache_key(cfg, reference, "tok-a", "corpus-b"),  # other corpus
        cache_key(mt_config(cfg.home, seq_len=64), reference, "tok-a", "corpus-a"),  # other packing
        cache_key(mt_config(cfg.home, cache_dtype="float32"), reference, "tok-a", "corpus-a"),  # other dtype
    ]
    assert len({base_key, *variants}) == 6


def test_corrupt_truncated_or_stale_caches_are_refused(small_world, reference, tmp_path):
    cfg = mt_config(small_world[0].home, reference=reference)
    rep = score_reference(cfg, reference)
    key, rows, seq_len = rep.cache.index["key"], rep.cache.index["rows"], rep.cache.index["seq_len"]
    copy = tmp_path / "cache"
    shutil.copytree(rep.cache.folder, copy)
    with pytest.raises(FlywheelError, match="stale"):
        open_cache(copy, "some-other-key", rows, seq_len)
    with pytest.raises(FlywheelError, match="holds"):
        open_cache(copy, key, rows + 1, seq_len)
    chunk = copy / "chunk-00000.npy"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(FlywheelError, match="checksum.*delete that folder"):
        open_cache(copy, key, rows, seq_len)
    chunk.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FlywheelError, match="truncated|checksum"):
        open_cache(copy, key, rows, seq_len, verify=False)


def test_interrupted_scoring_resumes_at_the_first_missing_chunk(small_world, reference):
    cfg = mt_config(small_world[0].home, reference=reference, seq_len=64)
    chunk_tokens = 64 * 16
    full = score_reference(cfg, reference, chunk_tokens=chunk_tokens)
    n = len(full.cache.chunks)
    assert n >= 4
    originals = [np.array(c) for c in full.cache.chunks]
    # Turn the finished cache back into what a run killed after n-2 chunks leaves behind.
    partial = full.cache.folder.with_name(full.cache.folder.name + ".partial")
    full.cache.folder.rename(partial)
    (partial / "index.json").unlink()
    for c in (n - 2, n - 1):
        (partial / f"chunk-{c:05d}.npy").unlink()
    resumed = score_reference(cfg, reference, chunk_tokens=chunk_tokens)
    assert resumed.computed_chunks == [n - 2, n - 1]
    assert not partial.exists()
    for a, b in zip(originals, resumed.cache.chunks, strict=True):
        assert np.array_equal(a, np.asarray(b))


def test_scoring_that_another_run_publishes_first_returns_that_cache_instead_of_failing(small_world, reference,
                                                                                        monkeypatch):
    """Two runs on one home scoring the same cache share its partial folder; the one that finishes second
    used to die on a vanished folder (found starting `flywheel midtrain` twice by hand)."""
    import flywheel.remit.scoring as scoring

    cfg = mt_config(small_world[0].home, reference=reference, seq_len=32)
    chunk_tokens = 32 * 16
    done = score_reference(cfg, reference, chunk_tokens=chunk_tokens)
    final = done.cache.folder
    assert len(done.cache.chunks) >= 3
    aside = final.with_name(final.name + ".aside")
    final.rename(aside)  # scoring starts again from nothing ...

    def the_other_run_publishes(name):  # ... and after its first chunk, the other run renames the folder
        if name == "score-reference-chunk" and not final.exists():
            shutil.rmtree(final.with_name(final.name + ".partial"))
            aside.rename(final)

    monkeypatch.setattr(scoring, "failpoint", the_other_run_publishes)
    again = score_reference(cfg, reference, chunk_tokens=chunk_tokens)
    assert again.cache.folder == final and again.computed_chunks == []
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(done.cache.chunks, again.cache.chunks,
                                                                              strict=True))


SCORE_RANK = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from flywheel.config import load_config
from flywheel.remit.scoring import score_reference
rep = score_reference(load_config({cfg!r}), {ref!r}, chunk_tokens=32 * 16)
print(json.dumps({{"rank": int(os.environ["RANK"]), "computed": rep.computed_chunks}}))
"""


def test_two_rank_torchrun_scoring_splits_the_chunks_and_writes_the_one_process_cache_byte_for_byte(
        small_world, reference, tmp_path):
    import yaml

    cfg0 = small_world[0]
    doc = {"name": "score2", "home": str(cfg0.home), "world": cfg0.world.model_dump(),
           "midtrain": {**MIDTRAIN, "seq_len": 32, "token_budget": 8192, "reference": reference}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    from flywheel.config import load_config

    cfg = load_config(tmp_path / "c.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each; so does this single process
    try:
        single = score_reference(cfg, reference, chunk_tokens=32 * 16)
    finally:
        torch.set_num_threads(threads)
    n = len(single.cache.chunks)
    assert single.computed_chunks == list(range(n)) and n >= 4
    expected = {p.name: p.read_bytes() for p in single.cache.folder.iterdir()}
    shutil.rmtree(single.cache.folder)
    script = tmp_path / "score.py"
    script.write_text(SCORE_RANK.format(repo=str(REPO), cfg=str(tmp_path / "c.yaml"), ref=reference))
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["computed"] for r in reports] == [list(range(0, n, 2)), list(range(1, n, 2))]
    got = {p.name: p.read_bytes() for p in single.cache.folder.iterdir()}
    assert got.keys() == expected.keys()
    assert all(got[k] == expected[k] for k in expected if k.startswith("chunk-"))
    index = json.loads(got["index.json"])
    assert index["chunks"] == json.loads(expected["index.json"])["chunks"]


def test_reference_with_another_vocabulary_is_refused_before_any_work(small_world, tmp_path):
    from flywheel.world.model import new_model
    from flywheel.world.tokenizer import train_tokenizer

    cfg, _ = small_world
    tok = train_tokenizer(["completely different words here"] * 50 + ["zebra quokka 123"] * 50)
    other = tmp_path / "other-ref"
    new_model("nano", tok, seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    before = sorted(cfg.home.rglob("*"))
    with pytest.raises(FlywheelError, match=r"different vocabularies: token id \d+ is"):
        midtrain(mt_config(cfg.home), reference=str(other))
    assert sorted(cfg.home.rglob("*")) == before, "nothing may be written before the check"


def test_remit_without_a_reference_says_how_to_get_one(small_world, capsys, tmp_path):
    import yaml

    from flywheel.cli import main

    cfg, _ = small_world
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "noref", "home": str(cfg.home), "world": cfg.world.model_dump(),
                                    "midtrain": {"objective": "remit"}}))
    assert main(["midtrain", str(path)]) == 2
    assert "midtrain.reference: objective 'remit' needs a reference model" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["ntp", "remit", "rho1", "kd"])
def test_each_objective_lowers_heldout_loss(small_world, reference, objective):
    cfg, report = small_world
    extra = {"reference_mode": "online"} if objective == "kd" else {}
    mcfg = mt_config(cfg.home, objective=objective, reference=reference, token_budget=24_576, **extra)
    res = midtrain(mcfg)
    before = heldout_eval_loss(report.paths.base, cfg)
    after = heldout_eval_loss(res.checkpoint, cfg)
    assert after < before - 0.05, (objective, before, after)
    assert (res.checkpoint / "model.safetensors").exists()
    assert not list(res.checkpoint.glob("*.bin"))


def test_rerun_with_same_inputs_reuses_the_finished_checkpoint(small_world, reference):
    cfg = mt_config(small_world[0].home, reference=reference)
    first = midtrain(cfg)
    again = midtrain(cfg)
    assert again.reused and again.checkpoint == first.checkpoint


def test_remit_run_logs_weight_diagnostics_and_writes_the_html_page(small_world, reference):
    res = midtrain(mt_config(small_world[0].home, reference=reference))
    logged = [h for h in res.metrics["log_history"] if "remit/weight_mean" in h]
    assert logged
    for h in logged:
        assert 0.8 <= h["remit/weight_mean"] <= 1.2
        assert 0 <= h["remit/clip_high"] <= 1 and 0 <= h["remit/clip_low"] <= 1
    page = res.html.read_text()
    assert page.count('title="w=') > 100
    assert "Most up-weighted token types" in page and "Most down-weighted token types" in page


class CrashAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_crashed_midtrain_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(small_world, reference,
                                                                                            tmp_path):
    cfg = mt_config(small_world[0].home, reference=reference, checkpoint_every=3, checkpoint_fraction=None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        midtrain(cfg, run_dir=tmp_path / "crashy", callbacks=[CrashAt(5)])
    resumed = midtrain(cfg, run_dir=tmp_path / "crashy")
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-3")
    clean = midtrain(cfg, run_dir=tmp_path / "clean")
    a = AutoModelForCausalLM.from_pretrained(resumed.checkpoint).state_dict()
    b = AutoModelForCausalLM.from_pretrained(clean.checkpoint).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_two_processes_and_one_process_with_the_same_global_batch_give_the_same_loss_curve(small_world, reference,
                                                                                          tmp_path):
    import yaml

    cfg, _ = small_world
    curves = {}
    for procs, batch in ((1, 8), (2, 4)):
        path = tmp_path / f"p{procs}.yaml"
        doc = {"name": f"ddp{procs}", "home": str(cfg.home), "world": cfg.world.model_dump(),
               "midtrain": {**MIDTRAIN, "batch_size": batch, "reference": reference, "token_budget": 8192}}
        path.write_text(yaml.safe_dump(doc))
        launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                    str(REPO / "deploy/accelerate/ddp.yaml")] if procs == 2 else [sys.executable]
        proc = subprocess.run([*launcher, "-m", "flywheel.cli", "midtrain", str(path)], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (metrics,) = (cfg.home / "runs" / f"ddp{procs}").glob("midtrain-*/metrics.json")
        curves[procs] = [h["loss"] for h in json.loads(metrics.read_text())["log_history"] if "loss" in h]
    assert len(curves[1]) == len(curves[2]) == 8
    assert np.allclose(curves[1][:4], curves[2][:4], atol=1e-4), curves


REAL_VOCAB = {"olmo2": 100_352, "smollm3": 128_256, "llama": 128_256}  # OLMo-2 1B, SmolLM3-3B, Llama 3


@pytest.mark.parametrize("arch", ["olmo2", "smollm3", "llama"])
def test_real_architecture_classes_midtrain_with_remit_at_their_real_vocabulary(small_world, tmp_path, arch):
    """The real configs' code path, on tiny random models of those classes at their real vocabulary (no hub)."""
    from flywheel.world.model import tiny_random_model

    cfg, report = small_world
    tok = AutoTokenizer.from_pretrained(report.paths.tokenizer)
    base, ref = tmp_path / f"{arch}-base", tmp_path / f"{arch}-ref"
    for folder, seed in ((base, 0), (ref, 1)):
        tiny_random_model(arch, tok, seed=seed, hidden=32, vocab_size=REAL_VOCAB[arch]).save_pretrained(folder)
        tok.save_pretrained(folder)
    res = midtrain(small_config(cfg.home, model={"source": str(base)},
                                midtrain={**MIDTRAIN, "reference": str(ref), "token_budget": 4096}))
    model = AutoModelForCausalLM.from_pretrained(res.checkpoint)
    name = {"olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert type(model).__name__ == name and model.config.vocab_size == REAL_VOCAB[arch]
    assert res.metrics["steps"] == 4 and res.metrics["loss_kernel"] == "chunked"
    assert all(math.isfinite(h["loss"]) for h in res.metrics["log_history"] if "loss" in h)


def test_a_checkpoint_half_written_by_a_kill_is_skipped_and_removed(tmp_path):
    from flywheel.data.io import last_complete_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert not (tmp_path / "checkpoint-15").exists()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_the_demo_midtrain_gives_the_same_loss_curve_with_the_chunked_and_the_eager_loss_kernel(small_world,
                                                                                             reference, tmp_path):
    import yaml

    cfg, _ = small_world
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["midtrain"]
    demo.update(reference=reference, token_budget=32_768)  # the demo's anneal, 16 steps of it
    curves = {}
    for kernel in ("chunked", "eager"):
        res = midtrain(small_config(cfg.home, midtrain={**demo, "loss_kernel": kernel}), run_dir=tmp_path / kernel)
        assert res.metrics["loss_kernel"] == kernel
        curves[kernel] = [h["loss"] for h in res.metrics["log_history"] if "loss" in h]
    assert len(curves["eager"]) == 16
    assert np.allclose(curves["chunked"], curves["eager"], rtol=0, atol=1e-4), curves


# --- delta_base: frozen (flywheel/remit/frozen.py) -------------------------------------------------


def _frozen_inputs(cfg):
    from flywheel.remit.midtrain import anneal_inputs

    return anneal_inputs(cfg, cfg.model.source, cfg.midtrain.reference)


def test_frozen_delta_equals_live_delta_at_step_zero_on_the_same_base(small_world, reference, tmp_path):
    cfg = mt_config(small_world[0].home, reference=reference, delta_base="frozen")
    inputs = _frozen_inputs(cfg)
    items = [PackedDataset(inputs.packed, inputs.cache, inputs.frozen)[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    frozen_trainer, live_trainer = _trainer(cfg, tmp_path / "f"), _trainer(cfg, tmp_path / "l")
    with torch.no_grad():
        live_cur = reference_logprobs(live_trainer.model, batch["input_ids"])
    ref, mask, docs = batch["ref_logprobs"][:, 1:], torch.ones_like(batch["ref_logprobs"][:, 1:], dtype=torch.bool), \
        batch["doc_ids"][:, 1:]
    from flywheel.remit.weights import remit_weights

    live_w = remit_weights(ref, live_cur[:, 1:], mask, 0.2, docs)
    frozen_delta, live_delta = ref - batch["base_logprobs"][:, 1:], ref - live_cur[:, 1:]
    # the base's cached log-probs are the live model's at step 0, rounded to float16 (<= 2^-11 relative)
    assert (frozen_delta - live_delta).abs().max() <= 2.0**-11 * live_cur.abs().max() + 1e-6
    assert (batch["frozen_weights"][:, 1:] - live_w).abs().max() < 5e-3
    assert not torch.equal(live_w, torch.ones_like(live_w))  # the weights do vary: the comparison means something
    live = {k: v for k, v in batch.items() if k not in ("frozen_weights", "base_logprobs")}
    loss_frozen, grads_frozen = _loss_and_grads(frozen_trainer, batch)
    loss_live, grads_live = _loss_and_grads(live_trainer, live)
    assert abs(float(loss_frozen) - float(loss_live)) < 1e-3 * float(loss_live)
    for a, b in zip(grads_frozen, grads_live, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-2)
    # the trainer applies the stored weights as they are: all ones make it plain NTP
    ones = {**batch, "frozen_weights": torch.ones_like(batch["frozen_weights"])}
    loss_ones, _ = _loss_and_grads(frozen_trainer, ones)
    loss_ntp, _ = _loss_and_grads(_trainer(cfg, tmp_path / "n", objective="ntp"), live)
    assert abs(float(loss_ones) - float(loss_ntp)) < 1e-6 and abs(float(loss_ones) - float(loss_frozen)) > 1e-5


def test_frozen_weights_are_a_pure_function_of_the_two_caches(small_world, reference, tmp_path):
    from flywheel.remit.frozen import frozen_key, frozen_weights

    cfg = mt_config(small_world[0].home, reference=reference, delta_base="frozen")
    inputs = _frozen_inputs(cfg)
    stored, base = inputs.frozen.weights, inputs.frozen.base
    # by hand, one document at a time: 2*sigmoid(delta - its document's mean delta), clipped to [0.8, 1.2]
    docs = np.asarray(inputs.packed.doc_ids[3], dtype=np.int64)[1:]
    delta = (np.asarray(inputs.cache.rows(3), np.float64) - np.asarray(base.rows(3), np.float64))[1:]
    expected = np.empty_like(delta)
    for d in np.unique(docs):
        centred = delta[docs == d] - delta[docs == d].mean()
        expected[docs == d] = np.clip(2 / (1 + np.exp(-centred)), 0.8, 1.2)
    got = np.asarray(stored.rows(3), np.float64)
    assert got[0] == 0 and np.abs(got[1:] - expected).max() < 1e-6  # float32, as the live formula gives them
    assert (got[1:] == np.float32(1.2)).any() and (got[1:] == np.float32(0.8)).any()  # the clip's ends exactly
    assert len(np.unique(docs)) > 1  # a row with several documents: each centred on its own
    # written again from the same two caches into another home: the same bytes
    other = cfg.model_copy(update={"home": tmp_path})
    again = frozen_weights(other, inputs.cache, base, inputs.packed)
    assert again.computed and again.weights.index["chunks"] == stored.index["chunks"]
    # the key follows the caches and the rule, nothing else
    assert frozen_key(cfg.midtrain, inputs.cache, base) == stored.index["key"]
    assert frozen_key(cfg.midtrain.model_copy(update={"epsilon": 0.5}), inputs.cache, base) != stored.index["key"]
    assert frozen_key(cfg.midtrain, base, inputs.cache) != stored.index["key"]


def test_a_frozen_anneal_trains_on_the_stored_weights_and_its_rerun_reuses_both_caches_and_them(small_world,
                                                                                                reference):
    cfg = mt_config(small_world[0].home, reference=reference, delta_base="frozen", token_budget=8192)
    first = _frozen_inputs(cfg)
    files = [p for c in (first.cache, first.frozen.base, first.frozen.weights) for p in sorted(c.folder.iterdir())]
    before = {p: p.stat().st_mtime_ns for p in files}
    res = midtrain(cfg)
    again = _frozen_inputs(cfg)
    assert not again.frozen.computed and {p: p.stat().st_mtime_ns for p in files} == before
    assert again.frozen.base.folder != again.cache.folder  # the base was scored into its own cache
    assert res.metrics["weight_rule"].endswith("δ against the frozen base")
    logged = [h for h in res.metrics["log_history"] if "remit/weight_mean" in h]
    assert logged and all(0.8 <= h["remit/weight_mean"] <= 1.2 for h in logged)
    live = mt_config(small_world[0].home, reference=reference, token_budget=8192)
    assert _frozen_inputs(live).key != again.key and again.frozen is not None and _frozen_inputs(live).frozen is None
    assert midtrain(cfg).reused


def test_frozen_delta_with_an_online_reference_is_refused_by_name():
    from flywheel.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="midtrain.delta_base: frozen reads the cached log-probs"):
        validate_config({"name": "x", "midtrain": {"delta_base": "frozen", "reference_mode": "online"}})


def test_delta_base_enters_the_midtrain_key_only_when_frozen_so_earlier_anneals_keep_theirs():
    from flywheel.config import validate_config
    from flywheel.remit.midtrain import midtrain_key

    def key(**mt):
        cfg = validate_config({"name": "test", "seed": 0, "home": "/tmp/x", "midtrain": mt})
        return midtrain_key(cfg, "base/id", "ref/id", "corpus")

    # the keys these configs had before delta_base existed (computed at commit 4d4ae40)
    assert key() == key(delta_base="live") == "dc7fc88ef4625310"
    assert key(objective="ntp") == "ebe781afd412f54f"
    assert key(epsilon=None, centring="zscore") == "7f8d3ebc3d4053ae"
    assert key(delta_base="frozen") not in {"dc7fc88ef4625310", key(epsilon=0.5)}


def test_a_frozen_row_is_a_writable_copy_of_the_stored_weights(small_world, reference):
    import warnings

    cfg = mt_config(small_world[0].home, reference=reference, delta_base="frozen")
    inputs = _frozen_inputs(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns (once per process) when it wraps a read-only memory map
        item = PackedDataset(inputs.packed, inputs.cache, inputs.frozen)[0]
    assert item["frozen_weights"].dtype == torch.float32
    assert not np.shares_memory(item["frozen_weights"].numpy(), inputs.frozen.weights.chunks[0])  # a copy

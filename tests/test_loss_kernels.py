"""The chunked loss kernel equals the eager one: losses, per-token tensors and gradients, every objective.

Eager (the model's full logits and objectives.py on them) is the reference implementation; the chunked
kernel (flywheel/remit/kernels.py) must give the same numbers without ever holding the (B, T, V) logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flywheel.errors import FlywheelError
from flywheel.remit import kernels
from flywheel.remit.catalog import objective_named
from flywheel.remit.kernels import Hidden, chunks, objective_parts

B, T, H, V = 3, 11, 8, 37  # 33 target positions: no chunk size below divides them, nor the vocabulary
KD = {"temperature": 2.0, "alpha": 0.3, "top_k": None}


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1, :] = True
    mask[2, 3:7] = False  # a masked run in the middle of a row
    targets = torch.where(mask, targets, -100)
    ref = -torch.rand(B, T, generator=g) * 4
    ref[~mask] = float("nan")  # what an invalid position may hold must never reach a result
    docs = torch.tensor([[0] * 4 + [1] * 7, [0] * 11, [0] * 2 + [1] * 5 + [2] * 4])  # packed documents
    ref_states, ref_weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    return states, weight, bias, targets, mask, ref, docs, ref_states, ref_weight


def _run(kernel: str, objective: str, chunk_tokens: int = 4, kd: dict = KD, docs: bool = True):
    states, weight, bias, targets, mask, ref, doc_ids, ref_states, ref_weight = _inputs()
    for t in (states, weight, bias):
        t.requires_grad_(True)
    if kernel == "eager":
        head, ref_head = F.linear(states, weight, bias), F.linear(ref_states, ref_weight)
    else:
        head, ref_head = Hidden(states, weight, bias), Hidden(ref_states, ref_weight)
    parts = objective_parts(kernel, objective, head, targets, mask, ref_logprobs=ref, ref_head=ref_head,
                            doc_ids=doc_ids if docs else None, epsilon=0.2, rho1_keep=0.7, kd=kd,
                            chunk_tokens=chunk_tokens)
    (parts.loss_sum * 0.37).backward()  # a non-unit upstream gradient, as the trainer's 1/N gives
    return {"loss": parts.loss_sum.detach(), "logp": parts.token_logprobs, "weights": parts.weights,
            "delta": parts.delta, "g_states": states.grad, "g_weight": weight.grad, "g_bias": bias.grad}


def _assert_close(got: dict, want: dict) -> None:
    for name, w in want.items():
        g = got[name]
        assert (g is None) == (w is None), name
        if w is not None:
            assert torch.isfinite(g).all(), name
            scale = w.abs().max().clamp(min=1e-12)
            assert float((g - w).abs().max() / scale) <= 1e-5, (name, float((g - w).abs().max() / scale))


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1000])
@pytest.mark.parametrize("objective", ["ntp", "remit", "rho1", "kd"])
def test_chunked_kernel_gives_the_eager_loss_per_token_tensors_and_gradients(objective, chunk_tokens):
    _assert_close(_run("chunked", objective, chunk_tokens), _run("eager", objective))


def test_chunked_remit_without_documents_centres_each_row_like_eager():
    _assert_close(_run("chunked", "remit", 4, docs=False), _run("eager", "remit", docs=False))


def test_chunked_kd_with_top_k_matches_eager():
    kd = {**KD, "top_k": 5}
    _assert_close(_run("chunked", "kd", 4, kd=kd), _run("eager", "kd", kd=kd))


def test_the_gradients_really_differ_between_objectives():
    """A guard on the comparison itself: ReMiT's weights and Rho-1's selection change the gradient."""
    ntp, remit, rho1 = (_run("chunked", o)["g_weight"] for o in ("ntp", "remit", "rho1"))
    assert not torch.allclose(ntp, remit, rtol=1e-3) and not torch.allclose(ntp, rho1, rtol=1e-3)


def test_chunks_cover_every_position_once_and_remit_chunks_are_whole_rows():
    for rows, cols, size, whole in ((3, 11, 4, False), (3, 11, 4, True), (5, 8, 16, False), (2, 9, 1000, True)):
        seen = torch.zeros(rows, cols, dtype=torch.int64)
        for r, c in chunks(rows, cols, size, whole):
            seen[r, c] += 1
            if whole:
                assert seen[r, c].shape[1] == cols
        assert (seen == 1).all()


def test_without_gradients_the_chunked_kernel_only_computes_values():
    states, weight, bias, targets, mask, *_ = _inputs()
    with torch.inference_mode():
        parts = objective_parts("chunked", "ntp", Hidden(states, weight, bias), targets, mask, chunk_tokens=5)
    want = F.cross_entropy(F.linear(states, weight, bias).reshape(-1, V), targets.reshape(-1), reduction="sum")
    assert torch.allclose(parts.loss_sum, want, rtol=1e-6) and not parts.loss_sum.requires_grad


# The real families at their real vocabulary sizes (tiny hidden sizes), through the trainer's own loss.
REAL_VOCAB = {"olmo2": 100_352, "smollm3": 128_256, "llama": 128_256}


@pytest.fixture(scope="module")
def tok():
    from .conftest import byte_tokenizer

    return byte_tokenizer()


def _trainer_grads(model, reference, objective, kernel, batch, tmp_path):
    from transformers import TrainingArguments

    from flywheel.remit.trainer import ReMiTTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = ReMiTTrainer(model=model, args=args, objective=objective, loss_kernel=kernel, loss_chunk_tokens=16,
                           reference_model=reference if objective == "kd" else None)
    assert trainer.loss_kernel == kernel
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["ntp", "remit", "kd"])
@pytest.mark.parametrize("arch", sorted(REAL_VOCAB))
def test_real_families_at_their_real_vocabulary_train_the_same_through_the_chunked_kernel(tok, arch, objective,
                                                                                       tmp_path):
    from flywheel.world.model import tiny_random_model

    model = tiny_random_model(arch, tok, seed=0, hidden=16, vocab_size=REAL_VOCAB[arch])
    reference = tiny_random_model(arch, tok, seed=1, hidden=16, vocab_size=REAL_VOCAB[arch])
    assert kernels.unsupported(model) is None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, REAL_VOCAB[arch], (2, 24), generator=g)
    labels = ids.clone()
    labels[0, 18:] = -100  # padding at the end of a row
    batch = {"input_ids": ids, "labels": labels, "doc_ids": torch.tensor([[0] * 10 + [1] * 14, [0] * 24]),
             "ref_logprobs": -torch.rand(2, 24, generator=g) * 12}
    eager_loss, eager = _trainer_grads(model, reference, objective, "eager", batch, tmp_path)
    chunked_loss, chunked = _trainer_grads(model, reference, objective, "chunked", batch, tmp_path)
    assert abs(chunked_loss - eager_loss) <= 1e-5 * abs(eager_loss)
    assert chunked.keys() == eager.keys()
    assert model.get_output_embeddings().weight.grad is not None  # the output layer trained (tied or not)
    for name, want in eager.items():
        err = float((chunked[name] - want).abs().max() / want.abs().max().clamp(min=1e-12))
        assert err <= 1e-5, (arch, objective, name, err)


def test_a_model_with_soft_capped_logits_falls_back_to_eager_or_is_refused_by_name(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=8, final_logit_softcapping=30.0, pad_token_id=0))
    assert "final_logit_softcapping=30.0" in kernels.unsupported(model)
    assert kernels.resolve("auto", "remit", model) == "eager"
    with pytest.raises(FlywheelError, match=r"midtrain.loss_kernel: chunked cannot .* set loss_kernel: eager"):
        kernels.resolve("chunked", "remit", model)


def test_fused_without_cuda_is_one_sentence_that_names_the_field_and_the_way_out(tok, monkeypatch):
    from flywheel.world.model import tiny_random_model

    model = tiny_random_model("llama", tok, hidden=16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the decision on a machine without a GPU
    with pytest.raises(FlywheelError, match=r"^midtrain.loss_kernel: fused needs .* set loss_kernel: chunked"):
        kernels.resolve("fused", "remit", model)
    assert kernels.resolve("auto", "remit", model) == "chunked"
    assert kernels.resolve("fused", "kd", model) == "chunked"  # kd has no fused path


def test_midtrain_refuses_fused_on_a_machine_without_it_before_any_work(tmp_path, monkeypatch):
    from flywheel.remit.midtrain import midtrain

    from .conftest import small_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI and laptops
    home = tmp_path / "home"
    cfg = small_config(home, midtrain={"objective": "ntp", "loss_kernel": "fused"})
    with pytest.raises(FlywheelError, match=r"^midtrain.loss_kernel: fused needs .*no CUDA device is visible"):
        midtrain(cfg)
    assert not (home / "cache").exists() and not (home / "runs").exists()  # no mixture, no scoring, no run folder


def test_the_kernel_table_is_what_the_config_accepts_and_auto_tries_fused_chunked_eager():
    import typing

    from flywheel.config import MidtrainConfig

    assert kernels.LOSS_KERNELS == ("auto", "chunked", "fused", "eager")
    assert typing.get_args(MidtrainConfig.model_fields["loss_kernel"].annotation) == kernels.LOSS_KERNELS
    assert [k.name for k in kernels.AUTO_ORDER] == ["fused", "chunked", "eager"]
    kd, remit = (objective_named(n) for n in ("kd", "remit"))
    assert kernels.FUSED.handles(remit) and not kernels.FUSED.handles(kd)  # kd has no log-prob form
    assert kernels.FUSED.machine_refusal(kd) is None  # so a machine without Liger does not refuse it


def test_midtrain_asks_the_objective_table_what_an_objective_needs(tmp_path, monkeypatch):
    """Change one entry's needs and midtrain, its cache key and the config follow, with no other edit."""
    from dataclasses import replace

    from flywheel.errors import ConfigError
    from flywheel.remit import catalog
    from flywheel.remit.midtrain import midtrain, midtrain_key

    from .conftest import small_config

    home = tmp_path / "home"
    cfg = small_config(home, midtrain={"objective": "ntp"})
    plain = midtrain_key(cfg, "base/id", "ref/id", "corpus")
    ntp = catalog.OBJECTIVES["ntp"]
    monkeypatch.setitem(catalog.OBJECTIVES, "ntp", replace(ntp, uses_ref_logprobs=True))
    with pytest.raises(FlywheelError, match=r"^midtrain.reference: objective 'ntp' needs a reference model"):
        midtrain(cfg)
    assert not home.exists()  # refused before any work
    assert midtrain_key(cfg, "base/id", "ref/id", "corpus") != plain  # the reference is now part of the key
    monkeypatch.setitem(catalog.OBJECTIVES, "ntp", replace(ntp, uses_ref_distribution=True))
    with pytest.raises(ConfigError, match="objective 'ntp' needs the reference's full distribution"):
        small_config(home, midtrain={"objective": "ntp"})

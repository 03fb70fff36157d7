"""The precision policy: model.dtype bfloat16 trains float32 master weights and AdamW state and publishes bfloat16,
so an anneal's decaying tail still moves the weights; pure bfloat16, asked for by name, rounds most of it away.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from flywheel.models import PURE_WARNING
from flywheel.posttrain import posttrain
from flywheel.remit.midtrain import midtrain

from .conftest import small_config

# 20 optimizer steps of NTP at the real configs' learning rate, decaying linearly to zero
ANNEAL = {"objective": "ntp", "token_budget": 20 * 4 * 64, "seq_len": 64, "batch_size": 4, "lr": 2e-4,
          "warmup_ratio": 0.05, "checkpoint_fraction": 0.5}


class Watch(TrainerCallback):
    """The trained parameters at 80% of the steps and at the end, and the dtypes inside every saved checkpoint."""

    def __init__(self) -> None:
        self.at_80: dict[str, torch.Tensor] = {}
        self.at_end: dict[str, torch.Tensor] = {}
        self.saved: list[tuple[set, set]] = []  # (parameter dtypes, AdamW state dtypes) per checkpoint

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == int(0.8 * state.max_steps):
            self.at_80 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.at_end = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            params = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
        moments = {str(t.dtype) for s in optimizer["state"].values() for t in s.values() if t.dim() > 0}
        self.saved.append((params, moments))

    def moved_in_the_tail(self) -> float:
        """The share of weights that changed at all during the last 20% of the steps."""
        changed = sum(int((self.at_80[n] != self.at_end[n]).sum()) for n in self.at_end)
        return changed / sum(t.numel() for t in self.at_end.values())


def _published(folder: Path) -> tuple[set, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return dtypes, json.loads((folder / "config.json").read_text())["dtype"]


def _anneal(home: Path, precision: str) -> tuple[Watch, Path]:
    watch = Watch()
    cfg = small_config(home, name=f"precision-{precision}", model={"dtype": "bfloat16", "precision": precision},
                       midtrain=ANNEAL)
    return watch, midtrain(cfg, callbacks=[watch]).checkpoint


def test_a_bf16_config_anneals_float32_masters_publishes_bf16_and_keeps_its_decaying_updates(small_world, tmp_path):
    watch, published = _anneal(small_world[0].home, "mixed")
    assert watch.saved and all(s == ({"F32"}, {"torch.float32"}) for s in watch.saved), watch.saved
    assert watch.moved_in_the_tail() > 0.9, watch.moved_in_the_tail()
    assert _published(published) == ({"BF16"}, "bfloat16")
    record = json.loads((published / "flywheel-midtrain.json").read_text())
    assert (record["precision"], record["master_dtype"], record["published_dtype"]) == ("mixed", "float32",
                                                                                       "bfloat16")
    assert record["compute_dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert (record["attn_implementation"], record["compile"], record["activation_checkpointing"]) == ("sdpa", False,
                                                                                                      False)
    assert record["speed"]["tokens_per_s"] > 0  # the speed monitor's summary travels with the model

    stage = {"kind": "sft", "data": "world:sft", "max_steps": 6, "batch_size": 4, "checkpoint_fraction": 0.5}
    sft = Watch()
    cfg = small_config(small_world[0].home, name="precision-sft", model={"dtype": "bfloat16"},
                       posttrain={"stages": [stage]})
    final = posttrain(cfg, published, callbacks=[sft]).stages[-1].checkpoint
    assert sft.saved and all(s == ({"F32"}, {"torch.float32"}) for s in sft.saved), sft.saved
    assert _published(final) == ({"BF16"}, "bfloat16")
    assert json.loads((final / "flywheel-posttrain.json").read_text())["master_dtype"] == "float32"


def test_pure_bf16_asked_for_by_name_warns_and_rounds_most_of_the_tail_away(small_world, tmp_path, capfd):
    watch, published = _anneal(small_world[0].home, "pure")
    assert PURE_WARNING.format(dtype="bfloat16") in capfd.readouterr().err
    assert watch.saved and all(s == ({"BF16"}, {"torch.bfloat16"}) for s in watch.saved), watch.saved
    assert watch.moved_in_the_tail() < 0.5, watch.moved_in_the_tail()
    assert json.loads((published / "flywheel-midtrain.json").read_text())["master_dtype"] == "bfloat16"


@pytest.mark.parametrize(("dtype", "precision"), [("float32", "mixed"), ("bfloat16", "pure")])
def test_the_precision_names_the_stages_cache_key_only_where_it_changes_training(small_world, dtype, precision):
    from flywheel.remit.midtrain import midtrain_key

    home = small_world[0].home
    base = small_config(home, model={"dtype": dtype, "precision": precision})
    other = small_config(home, model={"dtype": dtype, "precision": "pure" if precision == "mixed" else "mixed"})
    same = midtrain_key(base, "b", None, "c") == midtrain_key(other, "b", None, "c")
    assert same == (dtype == "float32")  # float32 weights train alike in either mode; bf16 ones do not


def test_flash_attention_without_its_package_or_a_gpu_is_one_sentence_before_any_load(small_world):
    from flywheel.errors import FlywheelError
    from flywheel.models import load_model

    cfg = small_config(small_world[0].home, model={"attn_implementation": "flash_attention_2"})
    with pytest.raises(FlywheelError, match=r"^model\.attn_implementation: flash_attention_2 needs (the flash-attn "
                                            r"package \(pip install flash-attn\)|a CUDA GPU), which this machine "
                                            r"lacks; use sdpa$"):
        load_model(cfg, cfg.model.source)

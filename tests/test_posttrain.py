"""Post-training end to end on the tiny world: the TRL chain, caching, resume, data checks, on-policy DPO."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from flywheel.data.io import read_jsonl
from flywheel.errors import FlywheelError
from flywheel.posttrain import posttrain
from flywheel.posttrain.chain import OWN_ARGS, plan_stages, trl_config_class
from flywheel.posttrain.monitor import ZERO_ADVANTAGE, ZeroAdvantageMonitor
from flywheel.posttrain.onpolicy import build_pairs, sample_completions
from flywheel.refs import world_paths

from .conftest import small_config

TINY = {"max_steps": 3, "batch_size": 4}
GRPO_TINY = {"max_steps": 2, "batch_size": 4, "args": {"num_generations": 2, "max_completion_length": 16}}
SEEN_COLUMNS: list[dict] = []


def recording_reward(completions, **columns):
    """A custom reward that remembers what TRL passed it and gives every completion the same score."""
    hooks = ("trainer_state", "log_extra", "log_metric")
    SEEN_COLUMNS.append({k: v for k, v in columns.items() if k not in hooks} | {"n": len(completions)})
    return [0.0] * len(completions)


def pt_config(home, stages, **posttrain_extra):
    return small_config(home, posttrain={"stages": stages, **posttrain_extra})


class CollectWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def base(small_world) -> Path:
    _, report = small_world
    return report.paths.base


@pytest.fixture(scope="module")
def chain(small_world, base):
    """sft -> dpo -> grpo from the world's base, run once for the tests that read its result."""
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [
        {"kind": "sft", **TINY},
        {"kind": "dpo", **TINY},
        {"kind": "grpo", **GRPO_TINY, "rewards": ["tests.test_posttrain.recording_reward"]},
    ], allow_custom_rewards=True)
    SEEN_COLUMNS.clear()
    handler = CollectWarnings()
    logging.getLogger("flywheel.posttrain").addHandler(handler)
    try:
        result = posttrain(cfg, base)
    finally:
        logging.getLogger("flywheel.posttrain").removeHandler(handler)
    return cfg, result, handler.messages, list(SEEN_COLUMNS)


# --- the chain ---------------------------------------------------------------------------------------------


def test_each_stage_writes_a_checkpoint_that_transformers_loads(chain):
    cfg, result, _, _ = chain
    assert [s.kind for s in result.stages] == ["sft", "dpo", "grpo"]
    run_dir = cfg.home / "runs" / cfg.name / f"posttrain-{result.key}"
    for i, stage in enumerate(result.stages):
        assert stage.checkpoint == run_dir / f"{i}-{stage.kind}" / "model"
        model = AutoModelForCausalLM.from_pretrained(stage.checkpoint)
        assert model.num_parameters() > 0
        tok = AutoTokenizer.from_pretrained(stage.checkpoint)
        assert "generation" in tok.chat_template  # the chat template travels with every checkpoint
        assert not (stage.checkpoint.parent / "checkpoints").exists()  # trainer checkpoints are cleaned up
    assert result.checkpoint == result.stages[-1].checkpoint


def test_each_stage_starts_from_the_previous_stage_output(chain, base):
    _, result, _, _ = chain
    sources = [json.loads((s.checkpoint / "flywheel-posttrain.json").read_text())["source"]
               for s in result.stages]
    assert sources == [str(base), str(result.stages[0].checkpoint), str(result.stages[1].checkpoint)]


def test_stages_report_steps_seconds_per_step_and_log_history(chain):
    _, result, _, _ = chain
    for stage in result.stages:
        assert stage.steps == (2 if stage.kind == "grpo" else 3)
        assert stage.seconds >= stage.seconds_per_step * stage.steps > 0
        assert any("loss" in h for h in stage.log_history)


def test_sft_changes_the_weights(chain, base):
    import torch

    _, result, _, _ = chain
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.stages[0].checkpoint).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_reward_receives_the_dataset_extra_columns(chain):
    cfg, _, _, seen = chain
    assert seen, "the reward function was never called"
    rl = {r["prompt"]: r for r in read_jsonl(world_paths(cfg).corpus("rl"))}
    call = seen[0]
    assert {"answer", "level", "id", "prompts"} <= set(call)
    assert len(call["answer"]) == len(call["level"]) == call["n"]
    for prompt, answer, level in zip(call["prompts"], call["answer"], call["level"], strict=True):
        row = rl[prompt[0]["content"]]  # conversational prompt: [{"role": "user", "content": question}]
        assert (answer, level) == (row["answer"], row["level"])


def test_a_batch_with_all_rewards_equal_is_logged_as_zero_advantage(chain):
    _, result, warnings, _ = chain
    grpo = result.stages[-1]
    logged = [h[ZERO_ADVANTAGE] for h in grpo.log_history if ZERO_ADVANTAGE in h]
    assert logged == [1.0, 1.0]
    assert sum("zero advantage" in m for m in warnings) == 2
    assert grpo.notes["zero_advantage_all_flat_logs"] == 2


def test_zero_advantage_monitor_warns_only_when_every_group_is_flat(caplog):
    from transformers import TrainerControl, TrainerState

    monitor, state = ZeroAdvantageMonitor(), TrainerState()
    for step, frac in [(1, 0.5), (2, 1.0)]:
        state.global_step = step
        logs = {"frac_reward_zero_std": frac, "reward": 0.0}
        state.log_history.append({**logs, "step": step})
        with caplog.at_level(logging.WARNING, logger="flywheel.posttrain"):
            monitor.on_log(None, state, TrainerControl(), logs=logs)
        assert logs[ZERO_ADVANTAGE] == state.log_history[-1][ZERO_ADVANTAGE] == frac
    assert monitor.flat_batches == 1
    assert [r.getMessage().startswith("GRPO step 2: zero advantage") for r in caplog.records] == [True]


def test_rerun_skips_finished_stages(chain, base):
    cfg, first, _, _ = chain
    again = posttrain(cfg, base)
    assert again.reused and again.key == first.key
    assert [s.checkpoint for s in again.stages] == [s.checkpoint for s in first.stages]
    assert again.seconds < 10
    assert again.stages[0].log_history == first.stages[0].log_history  # the history is kept with the stage


def test_a_changed_stage_list_gets_a_new_key(chain, base):
    cfg, first, _, _ = chain
    changed = cfg.model_copy(deep=True)
    changed.posttrain.stages[0].lr = 1e-4
    from flywheel.posttrain.chain import posttrain_key

    assert posttrain_key(changed, str(base), plan_stages(changed)) != first.key


# --- resume ------------------------------------------------------------------------------------------------


class CrashAt(TrainerCallback):
    """Fault injection: die in the middle of a stage, after the Trainer has saved a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"injected crash at step {self.step}")


def test_a_crash_mid_stage_resumes_from_its_checkpoint_and_skips_finished_stages(small_world, base):
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [
        {"kind": "sft", "max_steps": 2, "batch_size": 4},
        {"kind": "sft", "max_steps": 4, "batch_size": 4, "lr": 1e-4, "args": {"save_steps": 2}},
    ])
    with pytest.raises(RuntimeError, match="injected crash at step 3"):
        posttrain(cfg, base, callbacks=[CrashAt(3)])
    run_dir = next((cfg.home / "runs" / cfg.name).glob("posttrain-*/1-sft")).parent
    assert (run_dir / "0-sft" / "model").is_dir()
    assert not (run_dir / "1-sft" / "model").exists()
    assert (run_dir / "1-sft" / "checkpoints" / "checkpoint-2").is_dir()

    result = posttrain(cfg, base)
    first, second = result.stages
    assert first.reused and not second.reused
    assert second.resumed_from and second.resumed_from.endswith("checkpoint-2")
    assert second.steps == 2  # only steps 3 and 4 ran again
    assert max(h["step"] for h in second.log_history) == 4
    assert AutoModelForCausalLM.from_pretrained(result.checkpoint) is not None


# --- data and arguments are checked before anything trains ------------------------------------------------


GSM8K_ROW = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}  # GSM8K's answer is a solution


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_missing_column_names_the_file_the_columns_found_and_needed(small_world, base, tmp_path):
    cfg, _ = small_world
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1 + 1?", "solution": "#### 2"}])
    cfg = pt_config(cfg.home, [{"kind": "sft", "data": str(data)}])
    with pytest.raises(FlywheelError) as err:
        posttrain(cfg, base)
    msg = str(err.value)
    assert str(data) in msg and "posttrain.stages.0" in msg
    assert "prompt, completion" in msg and "found: question, solution" in msg and "columns" in msg


def test_a_mistyped_column_mapping_suggests_the_real_column(small_world, base, tmp_path):
    cfg, _ = small_world
    data = write_jsonl(tmp_path / "gsm.jsonl", [GSM8K_ROW])
    cfg = pt_config(cfg.home, [{"kind": "grpo", "data": str(data), "columns": {"questoin": "prompt"}}])
    with pytest.raises(FlywheelError, match=r"stages\.0\.columns: 'questoin' .*did you mean 'question'"):
        posttrain(cfg, base)


def test_gsm8k_style_columns_map_to_conversational_prompts_with_answers(small_world, tmp_path):
    cfg, _ = small_world
    data = write_jsonl(tmp_path / "gsm.jsonl", [GSM8K_ROW])
    cfg = pt_config(cfg.home, [{"kind": "grpo", "data": str(data), "columns": {"question": "prompt"}}])
    (plan,) = plan_stages(cfg)
    assert plan.data.rows == [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
                               "answer": "1 + 1 = 2\n#### 2"}]


def test_json_and_parquet_files_are_read_like_jsonl(small_world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, _ = small_world
    rows = [{"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4\n#### 4"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        (plan,) = plan_stages(pt_config(cfg.home, [{"kind": "sft", "data": str(tmp_path / name)}]))
        assert plan.data.rows[0]["completion"] == [{"role": "assistant", "content": "2 + 2 = 4\n#### 4"}]


def test_an_empty_file_says_so(small_world, base, tmp_path):
    cfg, _ = small_world
    (tmp_path / "empty.jsonl").write_text("")
    cfg = pt_config(cfg.home, [{"kind": "dpo", "data": str(tmp_path / "empty.jsonl")}])
    with pytest.raises(FlywheelError, match=r"empty\.jsonl: the file has no rows"):
        posttrain(cfg, base)


def test_non_utf8_bytes_say_so(small_world, base, tmp_path):
    cfg, _ = small_world
    row = '{"prompt": "caf\u00e9", "completion": "#### 1"}\n'
    (tmp_path / "latin1.jsonl").write_bytes(row.encode("latin-1"))
    cfg = pt_config(cfg.home, [{"kind": "sft", "data": str(tmp_path / "latin1.jsonl")}])
    with pytest.raises(FlywheelError, match=r"latin1\.jsonl: is not UTF-8"):
        posttrain(cfg, base)


def test_an_empty_cell_names_the_row_and_column(small_world, base, tmp_path):
    cfg, _ = small_world
    data = write_jsonl(tmp_path / "holes.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "q", "chosen": "", "rejected": "b"}])
    cfg = pt_config(cfg.home, [{"kind": "dpo", "data": str(data)}])
    with pytest.raises(FlywheelError, match=r"holes\.jsonl: row 2, column 'chosen' is empty"):
        posttrain(cfg, base)


def test_an_unknown_trl_arg_names_the_stage_and_the_closest_field(small_world, base, tmp_path):
    cfg, _ = small_world
    typo = {"kind": "grpo", **TINY, "args": {"num_generation": 4}}
    cfg = pt_config(cfg.home, [{"kind": "sft", **TINY}, typo])
    with pytest.raises(FlywheelError) as err:
        posttrain(cfg, base, run_dir=tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("posttrain.stages.1.args.num_generation: not a field of TRL's GRPOConfig")
    assert "num_generations" in msg
    assert not (tmp_path / "run").exists()  # the sft stage before it never started


def test_every_stage_is_checked_before_the_first_one_trains(small_world, base, tmp_path):
    cfg, _ = small_world
    bad = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "What is 1 + 1?"}])
    cfg = pt_config(cfg.home, [{"kind": "sft", **TINY}, {"kind": "grpo", **GRPO_TINY, "data": str(bad)}])
    needs = r"no_answer\.jsonl: posttrain\.stages\.1 \(grpo\) needs column\(s\) prompt, answer but answer is"
    with pytest.raises(FlywheelError, match=needs):
        posttrain(cfg, base, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stage_field_cannot_be_set_twice_through_args(small_world, base):
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [{"kind": "sft", "args": {"learning_rate": 0.1}}])
    with pytest.raises(FlywheelError, match=r"stages\.0\.args\.learning_rate: set posttrain\.stages\.0\.lr"):
        posttrain(cfg, base)


def test_a_grpo_batch_must_hold_whole_groups(small_world, base):
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [{"kind": "grpo", "batch_size": 6, "args": {"num_generations": 4}}])
    with pytest.raises(FlywheelError, match=r"stages\.0\.batch_size: .*\(6\) must be a multiple of "
                                            r"num_generations \(4\); use batch_size 8"):
        posttrain(cfg, base)


def test_settings_trl_rejects_are_reported_before_training(small_world, base):
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [{"kind": "grpo", "batch_size": 4, "args": {"num_generations": 1}}])
    with pytest.raises(FlywheelError, match=r"posttrain\.stages\.0\.args: TRL's GRPOConfig rejected"):
        posttrain(cfg, base)


def test_an_unreachable_hub_dataset_is_one_clear_sentence(small_world, base):
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [{"kind": "sft", "data": "nobody-here/no-such-dataset"}])
    with pytest.raises(FlywheelError, match=r"posttrain\.stages\.0\.data: could not fetch the dataset "
                                            r"'nobody-here/no-such-dataset' from the Hugging Face Hub \(offline"):
        posttrain(cfg, base)


def test_our_own_stage_options_never_shadow_a_trl_field():
    for kind, own in OWN_ARGS.items():
        fields = {f.name for f in dataclasses.fields(trl_config_class(kind))}
        assert not set(own) & fields


def test_bf16_and_gradient_checkpointing_are_on_only_on_a_gpu(small_world, tmp_path):
    import torch

    from flywheel.posttrain.chain import trl_config

    cuda = torch.cuda.is_available()
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [{"kind": "sft"}, {"kind": "grpo", "batch_size": 8}])
    sft, grpo = (trl_config(cfg, p, tmp_path) for p in plan_stages(cfg))
    for args in (sft, grpo):  # TRL's own defaults (bf16 and checkpointing on) only cost time on a CPU
        assert args.use_cpu == (not cuda) and not args.fp16
        assert args.bf16 == (cuda and torch.cuda.is_bf16_supported())
        assert args.gradient_checkpointing == cuda
        assert args.report_to in ("none", [], ["none"])
    assert sft.max_length == 128
    assert (grpo.num_generations, grpo.max_completion_length) == (8, 48)
    assert (grpo.temperature, grpo.beta) == (1.0, 0.0)
    assert not grpo.use_vllm


# --- on-policy DPO -----------------------------------------------------------------------------------------


def test_pairs_join_a_right_answer_with_a_wrong_one_and_count_the_rest():
    rows = [{"prompt": "a", "answer": "4"}, {"prompt": "b", "answer": "6"}, {"prompt": "c", "answer": "9"}]
    samples = [["#### 5", "2 + 2 = 4\n#### 4", "#### 4"],  # mixed: one pair
               ["#### 6", "#### 6", "#### 6"],  # all right: dropped
               ["#### 1", "nothing", "#### 2"]]  # all wrong: dropped
    pairs, stats = build_pairs(rows, samples)
    assert pairs == [{"prompt": "a", "chosen": [{"role": "assistant", "content": "2 + 2 = 4\n#### 4"}],
                      "rejected": [{"role": "assistant", "content": "#### 5"}]}]
    assert (stats.prompts, stats.pairs, stats.all_correct, stats.all_wrong) == (3, 1, 1, 1)
    assert stats.accuracy == pytest.approx(5 / 9)


def test_sampling_from_the_real_base_gives_k_replies_per_prompt(small_world, base):
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "What is 7 - 4?")]
    samples = sample_completions(model, tok, prompts, k=3, max_new_tokens=12)
    assert [len(s) for s in samples] == [3, 3]
    assert all(isinstance(t, str) and "<|" not in t for group in samples for t in group)


def test_on_policy_dpo_from_world_rl_trains_or_says_clearly_that_no_pair_exists(small_world, base):
    cfg, _ = small_world
    cfg = pt_config(cfg.home, [{"kind": "dpo", "data": "world:rl", **TINY,
                                "args": {"on_policy": True, "samples_per_prompt": 4, "on_policy_prompts": 12,
                                         "sample_max_tokens": 24}}])
    try:
        result = posttrain(cfg, base)
    except FlywheelError as exc:  # the tiny base is almost never right, so this is the expected outcome
        msg = str(exc)
        assert msg.startswith("posttrain.stages.0: on-policy DPO found no pairs: 0 pairs from 12 prompts x 4")
        assert "12 all wrong" in msg and "sft stage before" in msg
        saved = next((cfg.home / "runs" / cfg.name).glob("posttrain-*/0-dpo/pairs.json"))
        stats = json.loads(saved.read_text())
        assert stats["pairs"] == 0 and stats["all_wrong"] == 12
    else:
        notes = result.stages[0].notes
        assert 0 < notes["on_policy_pairs"] <= notes["on_policy_prompts"] == 12
        assert AutoModelForCausalLM.from_pretrained(result.checkpoint) is not None

"""`flywheel ...`: parse, call a stage function, print. No work happens here.

Every command that takes a config validates it first; any `FlywheelError` (bad config, bad
data, missing world) is printed as one sentence on stderr with exit code 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from flywheel.env import (
    apply_offline_env,
    command_config,
    exit_cleanly_on_sigterm,
    prepare_command,
    use_flywheel_prefect,
)

# Telemetry off before anything imports MLflow or Prefect; the offline switch waits for main(), which reads the
# config first (a hub config must reach the hub, the tiny world never does).
apply_offline_env(offline=False)

from flywheel import views  # noqa: E402
from flywheel.config import FlywheelConfig, config_home, load_config  # noqa: E402
from flywheel.console import wide_console  # noqa: E402
from flywheel.errors import ConfigError, FlywheelError, QuietUserErrors, os_error_sentence  # noqa: E402
from flywheel.refs import WORLD_SIZES  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Flywheel: ReMiT mid-training guided by the last round's RL model, round after round.")
world_app = typer.Typer(no_args_is_help=True, help="The offline tiny world: corpora, tokenizer, pre-anneal base.")
app.add_typer(world_app, name="world")
console = wide_console()
err_console = wide_console(stderr=True)
if not console.is_terminal:  # typer's help and usage lines: its own console reads this
    os.environ.setdefault("TERMINAL_WIDTH", str(console.width))

ConfigArg = Annotated[Path, typer.Argument(help="A flywheel YAML config (see configs/).", show_default=False)]


def _load(path: Path) -> FlywheelConfig:
    return load_config(path)


@app.command()
def validate(config: ConfigArg) -> None:
    """Check a config and print a short summary; one line per problem and exit 2 when invalid."""
    cfg = _load(config)
    views.config_table(console, cfg, f"{config}: valid")


@world_app.command("build")
def world_build(
    config: Annotated[Path, typer.Argument(help="Config whose seed, home and world section to use.")] = Path(
        "configs/demo.yaml"
    ),
    size: Annotated[str | None, typer.Option(help=f"Model size: {', '.join(WORLD_SIZES)}.")] = None,
) -> None:
    """Write the corpora, the tokenizer and a pre-trained base under home; reuse what exists."""
    cfg = _load(config)
    if size is not None and size not in WORLD_SIZES:
        raise FlywheelError(f"--size: must be one of {', '.join(WORLD_SIZES)} (got '{size}')")
    from flywheel.world.build import build_world

    report = build_world(cfg, size)
    views.world_report(console, report)


@app.command("prepare-data")
def prepare_data_cmd(
    config: ConfigArg,
    workers: Annotated[int | None, typer.Option(help="Build processes (default: data.workers, else one per core).")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print per source the files, bytes, estimated tokens, build "
                                                      "time and disk needed; build nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Build even when the disk looks too small.")] = False,
) -> None:
    """Tokenize every mid-training source into the token store and write the mixture's window index."""
    from flywheel.data.mixture import build_mixture, data_plan
    from flywheel.models import load_tokenizer, tokenizer_identity

    cfg = _load(config)
    if workers is not None and workers < 1:
        raise FlywheelError(f"--workers: must be 1 or more (got {workers})")
    tok = load_tokenizer(cfg)
    if plan:
        views.data_plan_report(console, cfg, data_plan(cfg, tok, tokenizer_identity(tok), workers))
        return
    with views.build_progress(err_console, cfg) as (on_source, on_tokens):
        corpus = build_mixture(cfg, tok, tokenizer_identity(tok), workers=workers, on_source=on_source,
                               on_tokens=on_tokens, force=force)
    views.mixture_report(console, cfg, corpus)


@app.command("score-reference")
def score_reference_cmd(
    config: ConfigArg,
    reference: Annotated[str | None, typer.Option(help="Reference model (default: midtrain.reference).")] = None,
) -> None:
    """Score the packed mid-training mixture with the frozen reference once; store 16-bit log-probs."""
    cfg = _load(config)
    reference = reference or cfg.midtrain.reference
    if reference is None:
        raise FlywheelError("midtrain.reference: no reference model to score with; set it or pass --reference")
    from flywheel.remit.scoring import score_reference

    views.reference_cache_report(console, score_reference(cfg, reference))


@app.command("midtrain")
def midtrain_cmd(
    config: ConfigArg,
    base: Annotated[str | None, typer.Option(help="Base checkpoint (default: model.source).")] = None,
    reference: Annotated[str | None, typer.Option(help="Reference model (default: midtrain.reference).")] = None,
) -> None:
    """Run the mid-training anneal (ReMiT or a baseline) and print where the checkpoint is."""
    cfg = _load(config)
    from flywheel.remit.midtrain import midtrain

    res = midtrain(cfg, base=base, reference=reference)
    if os.environ.get("RANK", "0") != "0":
        return  # under accelerate launch, only the main process reports
    views.midtrain_report(console, res)


@app.command("posttrain")
def posttrain_cmd(
    config: ConfigArg,
    checkpoint: Annotated[str, typer.Option(help="Checkpoint folder, world:<size> or hub id.")],
) -> None:
    """Run the configured TRL chain (sft / dpo / grpo) on a checkpoint; the last output is the RL model."""
    cfg = _load(config)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flywheel.posttrain").setLevel(logging.INFO)
    from flywheel.posttrain import posttrain

    views.posttrain_report(console, posttrain(cfg, checkpoint))


@app.command("evaluate")
def evaluate_cmd(
    config: ConfigArg,
    checkpoint: Annotated[str, typer.Option(help="Checkpoint folder, world:<size> or hub id.")],
    kind: Annotated[str, typer.Option(help="base: few-shot; post: zero-shot with the chat template.")] = "base",
) -> None:
    """Evaluate a checkpoint with lm-eval on the config's tasks and print the table."""
    cfg = _load(config)
    if kind not in ("base", "post"):
        raise FlywheelError(f"--kind: must be base or post (got '{kind}')")
    from flywheel.evaluation import evaluate, format_table

    result = evaluate(cfg, checkpoint, kind=kind)
    console.print(format_table(result.metrics), markup=False, highlight=False)
    console.print(f"results: {result.results_path}\nsamples: {result.samples_path}")


@app.command("stage", hidden=True)
def stage_cmd(
    name: Annotated[str, typer.Argument(help="score_reference | midtrain | posttrain | evaluate")],
    input_file: Annotated[Path, typer.Option("--input", help="The job's input: config, plan, stage arguments.")],
    result_file: Annotated[Path, typer.Option("--result", help="Where rank 0 writes the stage's result.")],
) -> None:
    """One stage of a round as a launched job (what `launch: torchrun | accelerate` runs on every rank)."""
    from flywheel.launch.worker import run_launched_stage

    run_launched_stage(name, input_file, result_file)


@app.command("render-job")
def render_job_cmd(
    config: ConfigArg,
    stage: Annotated[str, typer.Option(help="score_reference | midtrain | posttrain | evaluate")] = "midtrain",
    out: Annotated[Path, typer.Option(help="Folder for the files (default: home/launch/<name>/jobs/<stage>).")] = None,
    args: Annotated[str, typer.Option(help="More arguments of the stage command, e.g. \"--checkpoint DIR\".")] = "",
    image: Annotated[str, typer.Option(help="Container image of the Kubernetes job.")] = "ghcr.io/your-org/flywheel:latest",
) -> None:
    """Write a Slurm batch script and a Kubernetes Indexed Job that run one stage on launch.nnodes nodes."""
    import shlex

    from flywheel.config import LAUNCH_STAGES
    from flywheel.launch import render_jobs

    cfg = _load(config)
    if stage not in LAUNCH_STAGES:
        raise FlywheelError(f"--stage: must be one of {', '.join(LAUNCH_STAGES)} (got '{stage}')")
    spec = cfg.launch.for_stage(stage)
    if spec.kind == "local":
        spec = spec.model_copy(update={"kind": "torchrun"})  # a job file always starts torchrun agents
    folder = out or cfg.home / "launch" / cfg.name / "jobs" / stage
    command = [stage.replace("_", "-"), str(config.resolve()), *shlex.split(args)]
    files = render_jobs(cfg, spec, stage, command, folder, image=image)
    console.print(f"{stage} on {spec.nnodes} node(s) × {spec.nproc_per_node or 1} process(es):")
    console.print(f"  Slurm:      sbatch {files['slurm']}", soft_wrap=True)
    console.print(f"  Kubernetes: kubectl apply -f {files['kubernetes']}", soft_wrap=True)


@app.command()
def compare(config: ConfigArg) -> None:
    """Rounds × metrics with deltas against the previous round and round 0; writes and logs a PNG plot."""
    views.comparison(console, _load(config), prefix="")


@app.command()
def lineage(
    config: ConfigArg,
    version: Annotated[str | None, typer.Option(help="RL version (default: the current @reference).")] = None,
) -> None:
    """Print the chain: RL vN ← base vM (round k, guided by RL vK) ← … ← the pre-anneal base."""
    cfg = _load(config)
    from flywheel.tracking.registry import lineage as chain
    from flywheel.tracking.store import open_tracker

    for line in chain(open_tracker(cfg), version):
        console.print(line, markup=False, highlight=False)


@app.command()
def approve(
    config: ConfigArg,
    round_n: Annotated[int, typer.Option("--round", help="The round whose candidate awaits approval.")],
    decision: Annotated[bool, typer.Option("--approve/--reject", help="Approve (moves @reference) or reject.")],
    reason: Annotated[str, typer.Option(help="Why: recorded on the version and the round run.")],
) -> None:
    """Decide on a round that awaits approval (promotion.approval: required), as its Prefect pause form does."""
    cfg = _load(config)
    from flows.approval import decide_from_terminal

    console.print(decide_from_terminal(cfg, round_n, decision, reason), soft_wrap=True, markup=False)


@app.command()
def promote(
    config: ConfigArg,
    rollback: Annotated[bool, typer.Option("--rollback", help="Move @reference back.")] = False,
    to: Annotated[str | None, typer.Option(help="The RL version to restore (default: the one the current "
                                                "reference replaced).")] = None,
    reason: Annotated[str, typer.Option(help="Why: recorded on both versions.")] = "",
) -> None:
    """Roll @reference back (`--rollback [--to VERSION] --reason ...`); rounds promote by their gate."""
    cfg = _load(config)
    if not rollback:
        raise FlywheelError("promote: rounds promote through their gate (or `flywheel approve`); pass --rollback "
                            "[--to VERSION] --reason ... to move @reference back")
    from flywheel.tracking.approval import rollback as roll_back
    from flywheel.tracking.store import open_tracker

    done = roll_back(open_tracker(cfg), reason, to)
    console.print(f"{done.model}@reference: v{done.left} → v{done.restored} ({done.reason}); the next round plans "
                  f"with v{done.restored}", soft_wrap=True, markup=False)


@app.command()
def ui(
    config: ConfigArg,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect UI.")] = 4200,
) -> None:
    """Start the MLflow and Prefect UIs on 127.0.0.1 against the embedded stores; Ctrl-C, SIGTERM or SIGHUP stops both.

    Exits 0 after Ctrl-C, 143 after SIGTERM and 129 after SIGHUP (128 + the signal), with both servers stopped.
    """
    cfg = _load(config)
    from flywheel.tracking.ui import serve_uis

    code = serve_uis(cfg, mlflow_port, prefect_port, console.print)
    if code:
        raise typer.Exit(code)


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show every library's output (Trainer logs, "
                       "progress bars, warnings, Prefect's lines) instead of one line per stage.")]


def _world_quietly(cfg: FlywheelConfig, ladder: bool = True):  # noqa: ANN202 - BuildReport, imported lazily
    """Build (or reuse) the tiny world with its output in `home/logs/<name>/world.log` (unless --verbose)."""
    from flywheel.console import quiet_step
    from flywheel.world.build import build_world

    with quiet_step(cfg.home, cfg.name, "world"):
        return build_world(cfg, ladder=ladder)


@app.command("round")
def round_cmd(
    config: ConfigArg,
    round_n: Annotated[int | None, typer.Option("--round", help="Round number (default: the registry's next).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run one flywheel round through the Prefect flow: one line per stage; each stage's log under home/logs."""
    cfg = _load(config)
    use_flywheel_prefect(cfg.home)
    from flywheel.console import quiet_terminal

    with quiet_terminal(verbose):
        from flows.round import flywheel_round

        result = flywheel_round(str(config), round=round_n)
    views.round_outcome(console, result)


@app.command()
def rehearse(
    config: ConfigArg,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds to rehearse.")] = 2,
    rows: Annotated[int, typer.Option(min=1, help="Documents or rows read from each data source.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of every training stage.")] = 2,
    verbose: VerboseOpt = False,
) -> None:
    """The config's rounds in miniature on this CPU: real architecture, vocabulary, tokenizer, data formats, TRL
    arguments, tasks, gate and launcher; a checklist at the end. Exit 0 only when every stage passed."""
    cfg = _load(config)
    from flywheel.round.rehearsal import rehearsal_home

    use_flywheel_prefect(rehearsal_home(cfg))
    from flywheel.console import quiet_terminal

    with quiet_terminal(verbose):
        from flows.rehearsal import rehearse as run_rehearsal

        outcome = run_rehearsal(cfg, rounds, rows, steps)
    views.checklist(console, outcome)
    if not outcome.passed:
        raise typer.Exit(1)


@app.command("run")
def run_cmd(
    config: ConfigArg,
    rounds: Annotated[int, typer.Option(help="Run rounds until this many exist (round 0 included).")] = 3,
    verbose: VerboseOpt = False,
) -> None:
    """Build the world if needed, then run rounds until N exist; running again with a larger N continues."""
    cfg = _load(config)
    use_flywheel_prefect(cfg.home)
    from flywheel.console import quiet_terminal

    with quiet_terminal(verbose):
        if cfg.uses_world():
            _world_quietly(cfg, ladder=False)  # the flow reuses it
        from flows.round import flywheel

        flywheel(str(config), rounds_total=rounds)
    views.comparison(console, cfg)


@app.command()
def serve(
    config: ConfigArg,
    cron: Annotated[str, typer.Option(help="Schedule of flywheel-scheduled.")] = "0 3 * * *",
) -> None:
    """Serve the flywheel-round and flywheel-scheduled deployments from this process."""
    cfg = _load(config)
    use_flywheel_prefect(cfg.home)
    from flows.deploy import serve as serve_deployments

    serve_deployments(str(config), cron)


@app.command()
def deploy(
    config: ConfigArg,
    work_pool: Annotated[str, typer.Option(help="A process work pool on the server.")] = "flywheel-pool",
    cron: Annotated[str, typer.Option(help="Schedule of flywheel-scheduled.")] = "0 3 * * *",
) -> None:
    """Register both deployments with the Prefect server at PREFECT_API_URL."""
    _load(config)
    if not os.environ.get("PREFECT_API_URL"):
        raise FlywheelError("PREFECT_API_URL: not set; point it at your Prefect server (or use `flywheel serve`)")
    from flows.deploy import deploy as deploy_flows

    for dep_id in deploy_flows(str(config), work_pool, cron):
        console.print(f"deployment {dep_id}")
    console.print(f"start a worker: prefect worker start --pool {work_pool}")


@app.command()
def ablate(
    config: Annotated[Path | None, typer.Argument(help="A flywheel YAML config (see configs/).",
                                                  show_default=False)] = None,
    variants: Annotated[str | None, typer.Option(help="Comma-separated variant names (default: all); "
                        "`flywheel ablate --list-variants` lists them.")] = None,
    list_variants: Annotated[bool, typer.Option("--list-variants", help="List every variant with one line "
                             "of help, and exit.")] = False,
    seeds: Annotated[int | None, typer.Option(help="Seeds per variant (default 3; smoke 2).")] = None,
    size: Annotated[str, typer.Option(help="smoke | full (make replicate) | config (the config as written).")] = "config",
    smoke: Annotated[bool, typer.Option("--smoke", help="Same as --size smoke (minutes).")] = False,
    reference: Annotated[str | None, typer.Option(help="RL reference (default midtrain.reference, else made).")] = None,
    sft_reference: Annotated[str | None, typer.Option(help="SFT checkpoint for remit_sft_ref.")] = None,
    weak_reference: Annotated[str | None, typer.Option(help="Early RL checkpoint for remit_weak_ref.")] = None,
    dpo_reference: Annotated[str | None, typer.Option(help="DPO-only checkpoint for remit_dpo_ref.")] = None,
    strong_reference: Annotated[str | None, typer.Option(help="A far stronger reference for the remit_strong_* "
                                "variants (the dose and strong studies).")] = None,
    study: Annotated[str | None, typer.Option(help="A named set of variants instead of --variants: dose "
                     "(clip ε × reference × anneal length, with the oracle positive control), strong (clip ε × "
                     "RL or strong reference × live or frozen δ).")] = None,
    heldout: Annotated[str | None, typer.Option(help="Held-out text of the mid-training distribution (.jsonl with "
                       "a text field) for KL and the token-level loss (the tiny world makes its own).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (smoke/full: 1).")] = None,
) -> None:
    """Ablation: every variant × seed from one base on the same data; tables with 95% CIs, tokens-to-NTP, KL, plot."""
    if list_variants:
        from flywheel.ablation.catalogue import VARIANTS

        width = max(map(len, VARIANTS))
        for name, v in VARIANTS.items():
            typer.echo(f"{name:<{width}}  {v.about}")  # one line each, never wrapped
        return
    if config is None:
        raise FlywheelError("CONFIG: flywheel ablate needs a config file (e.g. configs/demo.yaml), "
                            "or --list-variants to see the variants")
    cfg = _load(config)
    from flywheel.ablation.catalogue import STUDIES

    if study is not None and study not in STUDIES:  # before a Prefect server starts for nothing
        raise FlywheelError(f"--study: must be one of {', '.join(STUDIES)} (got {study!r})")
    use_flywheel_prefect(cfg.home)
    from flows.ablation import flywheel_ablation

    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    report = flywheel_ablation(str(config), variants=names, seeds=seeds, size="smoke" if smoke else size,
                               reference=reference, sft_reference=sft_reference, weak_reference=weak_reference,
                               threads=threads, dpo_reference=dpo_reference, strong_reference=strong_reference,
                               study=study, heldout=heldout)
    views.ablation_report(console, report)


@app.command()
def demo(config: ConfigArg = Path("configs/demo.yaml"), verbose: VerboseOpt = False) -> None:
    """Offline demo: build the tiny world, run rounds 0, 1 (ReMiT-1) and 2 (ReMiT-2), print the comparison."""

    from flywheel.console import quiet_terminal

    t0 = time.perf_counter()
    cfg = _load(config)
    views.config_table(console, cfg, f"{config}")
    use_flywheel_prefect(cfg.home)
    with quiet_terminal(verbose):
        views.world_report(console, _world_quietly(cfg))
        from flows.round import flywheel

        results = flywheel(str(config), rounds_total=3)
    views.comparison(console, cfg)
    views.notes(console, results)
    console.print(f"demo took {time.perf_counter() - t0:.0f} s. See every run: flywheel ui {config}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2.

    So do a full disk, an exceeded quota and an unwritable or read-only home, wherever they surface
    (wrapped by MLflow, SQLAlchemy or Prefect, or inside an exception group): retrying cannot help,
    and finished work is kept (every artefact is written under a temporary name and renamed).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # their tracebacks would bury the one sentence
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietUserErrors) for f in logger.filters):
            logger.addFilter(QuietUserErrors())
    config_arg = command_config(args)
    try:
        exit_cleanly_on_sigterm()  # SIGTERM unwinds every command: temporary folders removed, exit 143
        prepare_command(args, config_arg)  # offline or not, and the home checked, before any hub library loads
        code = app(args=args, standalone_mode=False)  # click returns a typer.Exit's code here instead of raising
        if isinstance(code, int) and not isinstance(code, bool) and code:
            return code  # `flywheel ui`: 143 after SIGTERM, 129 after SIGHUP
    except ConfigError as exc:
        where = f"{exc.source}: " if exc.source else ""
        for problem in exc.problems:
            err_console.print(f"error: {where}{problem}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except FlywheelError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code  # 2 for bad input; 143 for a stage stopped by SIGTERM after saving
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as exc:  # usage errors: typer's vendored click's ClickException (a TyperException), or click's
        import click

        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()  # a usage line: an unknown option, a missing argument, a bad value
            return exc.exit_code
        home = config_home(config_arg) if config_arg else None
        sentence = os_error_sentence(exc, str(home) if home else None)
        if sentence is None:
            raise
        err_console.print(f"error: {sentence}", markup=False, highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

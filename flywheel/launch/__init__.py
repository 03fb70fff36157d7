"""Run one stage as a job: `flywheel stage NAME` under torchrun or accelerate, in its own process group.

Prefect stays the control plane, not the launcher. A flow's task calls `launched` (job.py), which writes the
stage's input (the validated config, the round's plan and the stage's arguments) to a folder under
`home/launch/`, starts the launcher (launchers.py: one entry per launcher) in a new session, streams rank 0's
lines to `say` as they reach its log, and reads the stage's result from the JSON file rank 0 writes. Every
rank writes `logs/rank<R>.log` and the launcher `logs/launcher.log`, files rather than pipes, so the job
never depends on this process staying alive; every log is kept as an MLflow artifact.

Inside the job, every rank runs `worker.run_launched_stage`: its logs to files (ranks.py), then the stage
from the round's stage table. Beyond one node, nodes.py renders a Slurm script and a Kubernetes job.

Stopping is never left to chance: an exception while waiting (Prefect cancels the flow run with
SIGTERM, a task timeout, Ctrl-C) or `timeout_minutes` sends SIGTERM to the whole group, every rank
saves a checkpoint at the end of its step (flywheel/safety.py), and whatever is still alive after
`grace_seconds` gets SIGKILL. If this process itself is killed outright, each rank notices that its
parent is gone (`watch_parent`) and stops the same way, so no orphaned rank keeps a device.

This package's `__init__` never imports `worker` (it reads the round's stage table, whose stages import
`launch_kind` from here).
"""

from flywheel.launch.job import (
    StageFailed,
    failing_rank,
    job_folder,
    keep_logs,
    launched,
    run_stage,
    stop_group,
)
from flywheel.launch.launchers import LAUNCHERS, Launcher, launcher_argv
from flywheel.launch.nodes import render_jobs
from flywheel.launch.ranks import (
    ENV_LAUNCH,
    ENV_LOGS,
    ENV_PARENT,
    launch_kind,
    rank_logs_to_file,
    watch_parent,
)

__all__ = ["ENV_LAUNCH", "ENV_LOGS", "ENV_PARENT", "LAUNCHERS", "Launcher", "StageFailed", "failing_rank",
           "job_folder", "keep_logs", "launch_kind", "launched", "launcher_argv", "rank_logs_to_file",
           "render_jobs", "run_stage", "stop_group", "watch_parent"]

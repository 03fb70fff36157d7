"""Inside a launched job: every rank runs `run_launched_stage` (what `flywheel stage NAME` does)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flywheel.config import validate_config
from flywheel.data.io import write_json
from flywheel.launch.ranks import rank_logs_to_file, watch_parent
from flywheel.round.stages import is_main_rank
from flywheel.round.table import launchable
from flywheel.safety import ProgressLog
from flywheel.tracking.registry import RoundPlan

PAYLOAD_FIELDS = ("config", "plan")  # the rest of the input file is the stage's own arguments


def run_launched_stage(name: str, input_file: Path, result_file: Path) -> None:
    """One stage of a round on this rank, as the stage table has it: logs to this rank's file, stops with its
    launcher, reads the job's input file; rank 0 writes the stage's result to `result_file`."""
    rank_logs_to_file()
    watch_parent()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for logger in ("flywheel", "flywheel.posttrain", "flywheel.midtrain"):
        logging.getLogger(logger).setLevel(logging.INFO)
    payload = json.loads(input_file.read_text())
    cfg = validate_config(payload["config"], str(input_file))
    stage = launchable(name)
    arguments = {k: v for k, v in payload.items() if k not in PAYLOAD_FIELDS}
    progress = ProgressLog(name, lambda message: print(message, flush=True))
    out = stage.call(cfg, RoundPlan.from_json(payload["plan"]), arguments, callbacks=[progress])
    if is_main_rank():
        write_json(result_file, out)

"""Deployments: `flywheel-round` (a form in the Prefect UI) and `flywheel-scheduled` (cron, no input)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CRON = "0 3 * * *"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def runner_deployments(config: str, cron: str = DEFAULT_CRON) -> list:
    """Both deployments for `prefect.serve` (a local process serves them; no work pool needed)."""
    from flows.round import flywheel_round

    config = str(Path(config).resolve())
    return [
        flywheel_round.to_deployment(name="flywheel-round", parameters={"config": config},
                                     description="Run one flywheel round; the form overrides config fields."),
        flywheel_round.to_deployment(name="flywheel-scheduled", parameters={"config": config}, cron=cron,
                                     description="The next round, on a schedule; the registry decides which."),
    ]


def serve(config: str, cron: str = DEFAULT_CRON) -> None:
    """Serve both deployments from this process until interrupted."""
    import prefect

    prefect.serve(*runner_deployments(config, cron))


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool `name` on the server unless it exists; True when it was created.

    `deploy()` refuses a pool that does not exist, and a worker started later would create it anyway.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:  # created at the same moment by a starting worker
            return False
        return True


def deploy(config: str, work_pool: str, cron: str = DEFAULT_CRON) -> list[str]:
    """Register both deployments with the server at PREFECT_API_URL, on a process work pool."""
    from prefect import flow

    config = str(Path(config).resolve())
    ensure_work_pool(work_pool)
    ids = []
    for name, schedule in (("flywheel-round", None), ("flywheel-scheduled", cron)):
        remote = flow.from_source(source=str(PROJECT_DIR), entrypoint="flows/round.py:flywheel_round")
        ids.append(str(remote.deploy(name=name, work_pool_name=work_pool, parameters={"config": config},
                                     cron=schedule, build=False, push=False, print_next_steps=False,
                                     ignore_warnings=True)))
    return ids

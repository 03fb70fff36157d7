"""Deployments: `flywheel-round` (a form in the Prefect UI) and `flywheel-scheduled` (cron, no input)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CRON = "0 3 * * *"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def form_notes(config: str) -> dict[str, str]:
    """Each override's value in the config file, appended to its description in the Prefect UI form."""
    from flywheel.config import load_config

    mt = load_config(config).midtrain
    eps = "none (no clip)" if mt.epsilon is None else f"{mt.epsilon:g}"
    return {"objective": mt.objective, "token_budget": f"{mt.token_budget:,}", "epsilon": eps}


def with_form_notes(deployment, config: str):  # noqa: ANN001, ANN201 - a RunnerDeployment
    """The deployment with "In the config when deployed: …" after each override's description."""
    props = deployment._parameter_openapi_schema.properties
    for name, value in form_notes(config).items():
        if name in props:
            props[name]["description"] = f"{props[name].get('description', '')} In the config when deployed: {value}."
    return deployment


def runner_deployments(config: str, cron: str = DEFAULT_CRON) -> list:
    """Both deployments for `prefect.serve` (a local process serves them; no work pool needed)."""
    from flows.round import flywheel_round

    config = str(Path(config).resolve())
    return [
        with_form_notes(flywheel_round.to_deployment(
            name="flywheel-round", parameters={"config": config},
            description="Run one flywheel round; the form overrides config fields."), config),
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
    from prefect import deploy as deploy_to_pool
    from prefect import flow

    config = str(Path(config).resolve())
    ensure_work_pool(work_pool)
    deployments = []
    for name, schedule in (("flywheel-round", None), ("flywheel-scheduled", cron)):
        remote = flow.from_source(source=str(PROJECT_DIR), entrypoint="flows/round.py:flywheel_round")
        dep = remote.to_deployment(name=name, parameters={"config": config}, cron=schedule)
        deployments.append(with_form_notes(dep, config) if name == "flywheel-round" else dep)
    ids = deploy_to_pool(*deployments, work_pool_name=work_pool, build=False, push=False,
                         print_next_steps_message=False, ignore_warnings=True)
    return [str(i) for i in ids]

"""The Prefect UI form of flywheel-round: a list to pick the objective from, each override described with its
config value, and every value still validated by the config model."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.config import load_config
from flywheel.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_form_offers_the_objectives_as_a_list_and_describes_each_override_with_its_config_value():
    from flows.deploy import runner_deployments

    form, scheduled = runner_deployments(str(REPO / "configs" / "demo.yaml"))
    props = form._parameter_openapi_schema.model_dump()["properties"]
    assert props["objective"]["enum"] == ["as configured", "ntp", "remit", "kd", "rho1"]
    assert "anyOf" not in props["objective"]  # one type: a drop-down, not a str/None toggle with a text box
    assert props["objective"]["description"].endswith("In the config when deployed: remit.")
    assert props["token_budget"]["description"].endswith("In the config when deployed: 300,000.")
    assert props["epsilon"]["description"].endswith("In the config when deployed: 0.2.")
    assert all(p.get("description") for p in props.values())  # config, round, force_promotion too
    # the scheduled deployment has no form to fill: its descriptions name no deploy-time value
    assert "when deployed" not in scheduled._parameter_openapi_schema.model_dump()["properties"]["objective"][
        "description"]


def test_form_values_are_validated_by_the_config_model_and_as_configured_keeps_the_file():
    from flows.round import AS_CONFIGURED, apply_overrides

    cfg = load_config(REPO / "configs" / "demo.yaml")
    kept = apply_overrides(cfg, AS_CONFIGURED, None, None, False)
    assert kept.midtrain.objective == "remit" and kept.midtrain.token_budget == 300_000
    changed = apply_overrides(cfg, "ntp", 4096, 0.1, True)
    assert (changed.midtrain.objective, changed.midtrain.token_budget, changed.midtrain.epsilon) == ("ntp", 4096, 0.1)
    assert changed.promotion.force
    with pytest.raises(ConfigError, match=r"midtrain.epsilon: must be <= 1 \(got 5.0\)"):
        apply_overrides(cfg, AS_CONFIGURED, None, 5.0, False)


def test_the_round_says_the_objective_it_runs_not_the_one_the_config_names():
    """An objective picked on the form is what the round's first log line names (issue 33: ntp said "ReMiT")."""
    from flows.round import apply_overrides
    from flywheel.round.settings import round_summary
    from flywheel.tracking.registry import RoundPlan

    cfg = load_config(REPO / "configs" / "demo.yaml")
    guided = RoundPlan(3, reference_version="demo-rl/2")
    assert round_summary(cfg, guided) == "ReMiT guided by demo-rl/2"
    assert round_summary(apply_overrides(cfg, "ntp", None, None, False), guided) == (
        "NTP (midtrain.objective ntp; the reference demo-rl/2 is not used)")
    rho1 = cfg.model_copy(update={"midtrain": cfg.midtrain.model_copy(update={"objective": "rho1"})})
    assert round_summary(rho1, guided) == "Rho-1 guided by demo-rl/2"
    assert round_summary(cfg, RoundPlan(0)) == "NTP (round 0)"

"""One flywheel round: a typed plan, the stage functions with their MLflow bookkeeping, and one table of stages.

- `plan.py`: `plan_round` reads the registry (or the round's recorded plan) into a `RoundPlan`.
- `settings.py`: the config a round's stages run with, and whether it scores the reference first.
- `stages.py`: the stage functions; `records.py` and `measures.py`: what they log and what they remember.
- `table.py`: the stages in order, with what each reads and whether it can be launched; the Prefect flow
  (flows/round.py), `direct.run_round_direct` and the launched-stage worker (flywheel/launch/worker.py) all
  run this table.
- `checks.py`, `ledger.py`, `report.py`: the gate-metric check, the home's ledger of rounds, the round's summary.

Prefect only wires the stages; every stage is idempotent on its own content key.
"""

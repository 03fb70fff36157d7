# Two commands for a new user: `make demo` and `make test`. Each bootstraps .venv itself:
# torch (CPU wheel) in its own step first, then the package; re-installs only when
# pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off

# The offline, no-telemetry environment: one list, shared with the CLI and the tests.
include flywheel/offline.env
export $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' flywheel/offline.env)

.PHONY: demo test lint bench replicate clean-venv
.DEFAULT_GOAL := test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing $(TORCH) (its own step, so pip never swaps in a CUDA build)"
	@$(PIP) -q "$(TORCH)" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import torch" || { echo "torch did not install"; exit 1; }
	@command -v bwrap >/dev/null || { echo "== installing bubblewrap (sandbox for code rewards; best effort)"; \
	  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || sudo -n apt-get install -y -qq bubblewrap >/dev/null 2>&1) \
	  || echo "   bubblewrap not installed: code rewards fall back to unshare without file-system isolation"; }
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "== installing postgresql (Debian's server binaries for the team-server test; best effort)"; \
	  (apt-get install -y -qq postgresql >/dev/null 2>&1 \
	   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1) \
	   || sudo -n apt-get install -y -qq postgresql >/dev/null 2>&1) \
	  || echo "   postgresql not installed: tests/test_team_server.py skips (and fails on CI)"; }
	@echo "== installing flywheel[dev]"
	@$(PIP) -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import flywheel.cli, trl, lm_eval, mlflow, prefect" || { echo "install failed"; exit 1; }
	@touch $@

demo: $(STAMP)
	$(BIN)/flywheel demo configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@ls bench/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	@for b in bench/*.py; do case $$b in bench/gpu_acceptance.py) continue;; esac; \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; done  # gpu_acceptance: on a GPU node by hand (make test runs --cpu --tiny)

# the study of docs/results.md (later variants are run by naming them: flywheel ablate --list-variants)
RESULTS_VARIANTS := ntp,remit,kd,rho1,miniplm,remit_sft_ref,remit_weak_ref,remit_eps0.1,remit_eps0.2,remit_eps0.3,remit_noclip
replicate: $(STAMP)
	$(BIN)/flywheel ablate configs/demo.yaml --size full --variants $(RESULTS_VARIANTS)

clean-venv:
	rm -rf $(VENV)

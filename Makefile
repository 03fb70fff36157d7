# Two commands for a new user: `make demo` and `make test`. Each bootstraps .venv itself: torch (CPU wheel)
# in its own pip step first, then deploy/requirements.lock exactly as written (uv, --no-deps: nothing is
# resolved), then the project; re-installs only when pyproject.toml or the lock changes. `make lock` rewrites
# the lock from a fresh resolution of pyproject.toml's ranges.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM := $(VENV)/.system-packages
LOCK   := deploy/requirements.lock
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off
UV     := $(BIN)/uv pip install --python $(BIN)/python --quiet
TORCH_VERSION = $$($(BIN)/python -W ignore -c "import torch; print(torch.__version__)")

# The offline, no-telemetry environment: one list, shared with the CLI and the tests.
include flywheel/offline.env
export $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' flywheel/offline.env)

.PHONY: demo test lint bench replicate lock clean-venv
.DEFAULT_GOAL := test

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing $(TORCH) (pip, its own step, so a machine's own torch build is used, never a swapped-in CUDA one)"
	@$(PIP) -q --no-compile "$(TORCH)" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -W ignore -c "import torch" || { echo "torch did not install"; exit 1; }
	@command -v bwrap >/dev/null || { echo "== installing bubblewrap (sandbox for code rewards; best effort)"; \
	  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || sudo -n apt-get install -y -qq bubblewrap >/dev/null 2>&1) \
	  || echo "   bubblewrap not installed: code rewards fall back to unshare without file-system isolation"; }
	@echo "== installing $(LOCK) with uv (exact versions, no resolution)"
	@$(PIP) -q "$$(grep '^uv==' $(LOCK))" 2>&1 | grep -v "is ignored: it is neither" || true
	@before=$(TORCH_VERSION); $(UV) --no-deps -r $(LOCK) && $(UV) --no-deps -e . \
	  && test "$(TORCH_VERSION)" = "$$before" || { echo "the locked install failed or changed torch"; exit 1; }
	@$(BIN)/uv pip check --python $(BIN)/python --quiet || { echo "$(LOCK) is not a closed set: run make lock"; exit 1; }
	@$(BIN)/python -W ignore -c "import flywheel.cli" || { echo "install failed"; exit 1; }
	@touch $@

# what only the tests need from the system: Debian's PostgreSQL server binaries for the team-server test
$(SYSTEM):
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "== installing postgresql (Debian's server binaries for the team-server test; best effort)"; \
	  (apt-get install -y -qq postgresql >/dev/null 2>&1 \
	   || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1) \
	   || sudo -n apt-get install -y -qq postgresql >/dev/null 2>&1) \
	  || echo "   postgresql not installed: tests/test_team_server.py skips (and fails on CI)"; }
	@mkdir -p $(VENV) && touch $@

# a fresh resolution of pyproject.toml's ranges (newest allowed versions) in a scratch venv, written to the lock;
# then run make test, which installs and tests exactly that
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)" uv
	.venv-lock/bin/uv pip install --python .venv-lock/bin/python --quiet -e '.[dev]'
	.venv-lock/bin/python deploy/lock.py
	rm -rf .venv-lock

demo: $(STAMP)
	$(BIN)/flywheel demo configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) $(SYSTEM) lint
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
	rm -rf $(VENV) .venv-lock

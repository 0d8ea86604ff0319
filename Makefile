# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.irmlens-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_MODE := disabled

.PHONY: demo test lint install clean-runs

# a failing pip stops the install with its own message (pipefail), not an ImportError later;
# only pip's "WARNING: Location" noise is filtered out
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location" || true; }

# torch is installed first and pinned: on these machines 2.13.0 is a CPU build on disk, while an
# unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@python3 -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 'irmlens needs Python >= 3.11 (pyproject.toml); python3 is ' + sys.version.split()[0] + ': install Python 3.11 or newer')"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install -q torch==2.13.0 $(QUIET_PIP)
	$(PY) -m pip install -q -e '.[dev]' $(QUIET_PIP)
	$(PY) -c "import irmlens, sae_training, torch, transformer_lens, sae_lens, trl"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/irmlens data fetch experiments/configs/tiny.toml
	$(VENV)/bin/irmlens run experiments/configs/tiny.toml --out runs/tiny

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

clean-runs:
	rm -rf runs/

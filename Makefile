# `make demo` trains and samples a tiny GPT-MoE on the embedded corpus; `make test` runs the suite.
# Both set themselves up: a .venv in the repo root, created once and reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.setup-done
# The versions the suite last passed with; `make setup` installs within them (see `constraints` below).
CONSTRAINTS := constraints.txt
# DeepSpeed compiles its CPU ops (shared-memory comm, CPU Adam) on first use into TORCH_EXTENSIONS_DIR. Its
# default, ~/.cache/torch_extensions, is shared by every checkout on the machine, and a build is keyed by the
# sources' path, so two checkouts rebuild over each other's ops (minutes each); keep them with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup test demo compare constraints golden clean-venv

setup: $(STAMP)

# Re-runs only when setup.py or constraints.txt changes; a second `make setup` is a no-op.
$(STAMP): setup.py $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep an existing torch (e.g. a CUDA build on a cluster image); otherwise pin a CPU-sized one
	@# first, so no dependency's range pulls a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test,eval]"
	@touch $(STAMP)

# Record the installed versions as constraints.txt: after changing a dependency in setup.py, `make setup`
# (a new package comes in at its newest version within the pins), `make test`, then this; commit the file on
# its own. torch is left out: `make setup` installs $(TORCH_PIN) first and keeps a cluster's own build.
constraints: setup
	@{ echo "# Versions the test suite last passed with; \`make setup\` installs within them (pip -c)."; \
	  echo "# Regenerate with \`make constraints\` after a green \`make test\` (README: Installing)."; \
	  echo "# torch is not listed: make setup installs $(TORCH_PIN) first and keeps an existing build."; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|gptmoe-toolkit)=='; } > $(CONSTRAINTS).tmp
	@mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS): $$(grep -vc '^#' $(CONSTRAINTS)) packages"

# Rewrite the golden loss curve (tests/train/golden_nano_losses.json) after a deliberate numeric change.
golden: setup
	$(PY) tests/train/golden.py --write

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

demo: setup
	bash examples/demo.sh

# Dense vs MoE at equal training tokens on the embedded corpus: docs/compare.md and docs/compare.png
# (every model: about 30 minutes on 2 quiet cores; runs are kept under runs/compare and reused).
compare: setup
	$(PY) examples/compare.py

clean-venv:
	rm -rf $(VENV)

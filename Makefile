# Two commands (see README): `make demo` and `make test`. Both create the virtual
# environment on first use. torch is pinned to the CPU-usable build this project is
# developed and measured with.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench mutation clean

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
	rm -rf $(VENV) build *.egg-info .mutation

# Two commands (see README): `make demo` and `make test`. Both create the virtual
# environment on first use. torch is pinned to the CPU-usable build this project is
# developed and measured with.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tokenprune demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/tokenprune bench --model deit_small_patch16_224 --method tome --option r=13

clean:
	rm -rf $(VENV) build *.egg-info

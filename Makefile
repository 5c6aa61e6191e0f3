# Two entry points: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that pip takes the CPU build on a machine without CUDA (here it lies
# on disk) and never pulls several GB of CUDA wheels by accident.
TORCH ?= torch==2.13.0
RUN ?= runs/g2p
MINUTES ?= 10

.PHONY: install demo test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,plot]"
	$(BIN)/python -m transduce.kernels
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/transduce train recipes/g2p_cmudict.yaml --out $(RUN) --set train.max_minutes=$(MINUTES)
	$(BIN)/transduce evaluate --model $(RUN) --show 8
	printf 'transduce\nencoder\ndecoder\nphoneme\nsaturday\n' | $(BIN)/transduce translate --model $(RUN)

test: install
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache

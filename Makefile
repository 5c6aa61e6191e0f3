# Two entry points: `make demo` (install + main job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that pip takes the CPU build on a machine without CUDA (here it lies
# on disk) and never pulls several GB of CUDA wheels by accident.
TORCH ?= torch==2.13.0
RUN ?= runs/g2p
MINUTES ?= 10

.PHONY: install demo hour test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,plot,fast]"
	$(BIN)/python -m transduce.kernels
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/transduce train recipes/g2p_cmudict.yaml --out $(RUN) --set train.max_minutes=$(MINUTES)
	$(BIN)/transduce evaluate --model $(RUN) --show 8
	printf 'transduce\nencoder\ndecoder\nphoneme\nsaturday\n' | $(BIN)/transduce translate --model $(RUN)

# The hour's recipe (README, "Ensembles"): two models trained at once, one thread each (the same CPU
# time as one run on 2 threads), the second writing right to left, decoded together (each direction's
# n-best rescored by both); the recipe's gated feed-forward blocks (GEGLU) at ff_dim 512, the parameters
# of GELU at 768; the first member's log goes to $(RUN)_hour1.log.
HOUR := --set train.max_minutes=60 --set model.d_model=192 --set model.ff_dim=512 \
	--set model.dropout=0.05 --set train.lr=1e-3 \
	--set train.threads=1 --set decode.workers=1
hour: install
	mkdir -p $(dir $(RUN))
	$(BIN)/transduce train recipes/g2p_cmudict.yaml --out $(RUN)_hour1 $(HOUR) --set train.seed=1 \
		> $(RUN)_hour1.log 2>&1 & \
	$(BIN)/transduce train recipes/g2p_cmudict.yaml --out $(RUN)_hour2 $(HOUR) --set train.seed=2 \
		--set data.target_tokenizer.reverse=true; \
	rc=$$?; wait $$! && exit $$rc
	$(BIN)/transduce evaluate --model $(RUN)_hour1 $(RUN)_hour2 --workers 2 --show 8

test: install
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache

# camelid: every target depends on `setup`, so `make demo` or `make test` works as the
# first command on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.camelid-installed
# No visible GPU -> pin the CPU wheel of torch (see constraints-cpu.txt).
TORCH_CONSTRAINT := $(shell nvidia-smi -L >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
PYTEST_ARGS ?=
# The suite's runs often wait (on another rank, a launcher, a rendezvous): on 2 cores, two
# workers kept the CPUs 88% busy, three 93% (20.0 -> 16.9 min). Each worker takes whole files,
# so module-scoped shared runs are made once, in xdist's own order (handing the longest files
# out first measured the same: 21.8 min both ways on the same, slowed, machine).
TEST_WORKERS ?= 3
# DeepSpeed compiles its ops on first use (~60 s for the CPU shared-memory comm op): keep them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

NGPU     ?= 2
STRATEGY ?= fsdp
OUT      ?= runs/vicuna
ARGS     ?=

.PHONY: lint-check setup demo qlora-demo dpo-demo long-demo rl-demo train-rl test test-fast bench bench-compare bench-peers bench-rl lint clean train-vicuna train-dpo \
        gpu-wheels gpu-check gpu-dry-run

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt requirements-reference.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_CONSTRAINT) -e '.[dev]'
	# FastChat (reference for tests and benchmarks): --no-deps, see requirements-reference.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-reference.txt
	$(BIN)/python -m pip install -q $(TORCH_CONSTRAINT) requests
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; \
	  a().device_name() != 'cpu' or a().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

demo: setup
	$(BIN)/python -m recipes.demo

# full fine-tune on English Alpaca, QLoRA to Chinese Alpaca, evaluation table, merge, chat
qlora-demo: setup
	$(BIN)/python -m recipes.qlora_demo

# ShareGPT conversations joined into long ones, a 2K-context tiny Llama trained at 4K: 2 processes,
# sequence parallel 2, linear RoPE scaling; the export loaded by plain transformers
long-demo: setup
	$(BIN)/python -m recipes.long_demo

# Alpaca preference pairs, SFT of the small tiny Llama, DPO, held-out preference accuracy
dpo-demo: setup
	$(BIN)/python -m recipes.dpo_demo

# CI runs exactly this (.ci/run): the formatter and linter first, then the suite
test: setup lint-check
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

# make train-vicuna NGPU=4 STRATEGY=fsdp|zero2|zero3|zero3_offload|ddp MODEL=... DATA=... CONFIG=... OUT=... ARGS="--key value"
# Without MODEL: the demo's tiny Llama and identity data (python -m recipes.demo --assets_only).
RECIPE ?= sft
train-vicuna: setup
	@set -e; if [ -z "$(MODEL)" ]; then set -- $$($(BIN)/python -m recipes.demo --assets_only); \
	  M=$$1; D=$${2:-}; else M="$(MODEL)"; D="$(DATA)"; fi; \
	$(BIN)/python -m launch.train --recipe $(RECIPE) --ngpu $(NGPU) --strategy $(STRATEGY) --out $(OUT) \
	  --model "$$M" $${D:+--data "$$D"} $(if $(CONFIG),--config $(CONFIG)) -- $(ARGS)

# make train-dpo NGPU=4 STRATEGY=zero3 MODEL=SFT_MODEL DATA=pairs.json [CONFIG=... OUT=... ARGS=...]
train-dpo: setup
	$(BIN)/python -m launch.train --recipe dpo --ngpu $(NGPU) --strategy $(STRATEGY) --out $(if $(filter runs/vicuna,$(OUT)),runs/dpo,$(OUT)) \
	  --model $(or $(MODEL),$(error MODEL=... is needed: the SFT model to tune)) --data $(or $(DATA),$(error DATA=... is needed: preference pairs, see python -m fastchat_data pair)) \
	  $(if $(CONFIG),--config $(CONFIG)) -- $(ARGS)

# Skip the slow multi-process tests locally; CI runs everything through `make test`.
test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# Peers (TRL, LLaMA-Factory) in virtualenvs of their own under .bench-venv/, never in $(VENV).
bench-peers: setup
	PYTHON=$(PYTHON) bash bench/peers_env.sh
	$(BIN)/python -m bench.peers_bench $(PEERS_ARGS)

# camelid's GRPO step (generation / update seconds) against TRL's GRPOTrainer, same model and prompts
bench-rl: setup
	$(BIN)/python -m bench.rl_bench $(RL_BENCH_ARGS)

bench: setup
	$(BIN)/python -m bench.data_bench
	$(BIN)/python -m bench.train_bench
	$(BIN)/python -m bench.qlora_bench
	$(BIN)/python -m bench.memory_bench
	$(BIN)/python -m bench.loss_bench
	$(BIN)/python -m bench.packing_bench
	$(BIN)/python -m bench.fault_bench
	$(BIN)/python -m bench.compile_bench
	$(BIN)/python -m bench.dpo_bench

# Old tree vs this one, the same training measurement interleaved on this machine (not part of
# `bench`: it needs a checkout of the old tree): make bench-compare BASELINE=/path/to/old/tree
BASELINE ?=
COMPARE_ARGS ?=
bench-compare: setup
	$(BIN)/python -m bench.compare_trees --baseline $(or $(BASELINE),$(error BASELINE=... is needed: \
	  a checkout of the tree to compare with)) $(COMPARE_ARGS)

# make train-rl NGPU=4 STRATEGY=fsdp MODEL=SFT_MODEL DATA=prompts.json ARGS="--reward_funcs M:F,..."
# (GRPO, or RLOO with ARGS="--advantage rloo ..."; prompts: python -m recipes.core.rewards.arithmetic)
train-rl: setup
	$(BIN)/python -m launch.train --recipe grpo --ngpu $(NGPU) --strategy $(STRATEGY) --out $(if $(filter runs/vicuna,$(OUT)),runs/grpo,$(OUT)) \
	  --model $(or $(MODEL),$(error MODEL=... is needed: the SFT model to train)) --data $(or $(DATA),$(error DATA=... is needed: prompts, see python -m recipes.core.rewards.arithmetic)) \
	  $(if $(CONFIG),--config $(CONFIG)) -- $(ARGS)

# tiny SFT on arithmetic problems, then GRPO with the arithmetic rewards; held-out rewards before/after
rl-demo: setup
	$(BIN)/python -m recipes.rl_demo

# The GPU proof kit (README "On a GPU"). Here: the wheels the bare GPU image lacks, into .whl/
# (ignored), the total printed against the device tool's 64 MiB.
gpu-wheels: setup
	$(BIN)/python -m bench.gpu_wheels

# There, on the GPU machine: no `setup` (its python3 holds torch; nothing can be downloaded),
# the carried wheels go into /tmp/site, then the check, under 8 minutes.
GPU_CHECK_ARGS ?=
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	PYTHONPATH=/tmp/site$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 python3 -m bench.gpu_check $(GPU_CHECK_ARGS)

# The same check on this CPU, tiny shapes (what tests/test_gpu_check.py runs, with more rows).
gpu-dry-run: setup
	$(BIN)/python -m bench.gpu_check --dry_run

lint: setup lint-check

lint-check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache build *.egg-info

# apex — set-up, demo and tests. `make demo` and `make test` each do all their own set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where a CPU-only machine gets a CPU build of torch when no local wheel is configured.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO ?= runs/demo

.PHONY: install demo test test-all lint bench docs clean deqa-server mini-weights

install: $(VENV)/.installed

# torch goes in first, chosen for this machine: the CUDA build where nvidia-smi sees a GPU
# (PyPI's default Linux wheel), else a CPU build: a local wheel from pip's configured
# find-links (its dependencies then from the index), else the CPU index. `pip install -e .` then finds its torch requirement satisfied and pulls no other.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		if $(BIN)/python -m pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
			$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
		else \
			$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
		fi; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# the pretrained mini preset trained as shipped (60 updates) with apex and with static weights on
# its four objectives, the two runs side by side with half the cores each; then samples from the
# apex run, their scores, and the pareto report with the base-vs-runs image strip
DEMO_STEPS ?= 60
DEMO_THREADS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 1 ? n / 2 : 1 )))
DEMO_SET ?= train.steps=$(DEMO_STEPS) eval.every=$(DEMO_STEPS) train.checkpoint_every=$(DEMO_STEPS)

demo: install
	rm -rf $(DEMO)
	mkdir -p $(DEMO)
	@echo "training static in the background (log: $(DEMO)/static.log) and apex here, $(DEMO_THREADS) thread(s) each"
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/apex train --preset mini --out $(DEMO)/runs/static --balance static $(DEMO_SET) logging.progress=false > $(DEMO)/static.log 2>&1 & static=$$!; \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/apex train --preset mini --out $(DEMO)/runs/apex --balance apex $(DEMO_SET); apex=$$?; \
	if ! wait $$static; then echo "the static run failed; its log: $(DEMO)/static.log"; tail -n 5 $(DEMO)/static.log; exit 1; fi; \
	tail -n 1 $(DEMO)/static.log; exit $$apex
	$(BIN)/apex sample --preset mini --lora $(DEMO)/runs/apex --prompt 'a sign that says "STOP"' --prompt "two red circles on the left on white" --num-images 4 --out $(DEMO)/samples
	$(BIN)/apex score $(DEMO)/samples --objectives adherence,quality,appeal,ocr --set rewards.ocr.det_side=128 --out $(DEMO)/scores
	$(BIN)/apex pareto $(DEMO)/runs --out $(DEMO)/pareto
	@echo
	@echo "demo outputs under $(DEMO)/:"
	@echo "  runs/apex, runs/static   config.yaml, metrics.jsonl, checkpoints/, eval/ (two mini training runs; static.log: the static run's output)"
	@echo "  samples/                 PNGs + metadata.jsonl from the apex run's LoRA"
	@echo "  scores/                  scores.jsonl, scores.csv"
	@echo "  pareto/                  report.md (samples.png: base model vs each run), pareto.json, plots"

# the fast suite (markers slow, cuda, paddle, real_weights deselected in pyproject.toml);
# --durations lists the slowest tests, so a test that grows shows up
test: install
	$(BIN)/python -m pytest -q --durations=15

# everything a CPU can run: also the minutes-long two-process DDP/FSDP and torch.compile checks
test-all: install
	$(BIN)/python -m pytest -q --durations=30 -m "not cuda and not paddle and not real_weights"

# the configuration reference, generated from the config dataclasses' field docstrings
# (tests/test_reference.py fails when the committed page is stale)
# style (ruff's rules and format, pyproject.toml) and words: the repository speaks of the product only
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	bash tools/check_process_words.sh

docs: install
	$(BIN)/python -m apexcli.reference --out docs/guide/configuration.md

bench: install
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_balance.py --seeds 5
	$(BIN)/python benchmarks/bench_score.py

# DeQA-Score's reward server in its own venv: its remote code needs transformers 4.36.1, the
# training env has >= 4.46. torch as for `install` (PyPI's wheel, or a local one pip finds);
# apexcli without dependencies (the server imports only its reward modules). Then run
#   .venv-deqa/bin/python -m apexcli.rewards.deqa_server --trust-remote-code --source DIR
# and train with deqa@http://127.0.0.1:18086 (docs/guide/rewards.md, "DeQA-Score").
DEQA_VENV ?= .venv-deqa
DEQA_TORCH ?= $(TORCH_VERSION)

deqa-server: $(DEQA_VENV)/.installed

$(DEQA_VENV)/.installed: requirements-deqa.txt pyproject.toml
	test -x $(DEQA_VENV)/bin/python || $(PYTHON) -m venv $(DEQA_VENV)
	$(DEQA_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEQA_VENV)/bin/python -m pip install -q "torch==$(DEQA_TORCH)"
	$(DEQA_VENV)/bin/python -m pip install -q -r requirements-deqa.txt
	$(DEQA_VENV)/bin/python -m pip install -q --no-deps -e .
	$(DEQA_VENV)/bin/python -m apexcli.rewards.deqa_server --help >/dev/null
	touch $@

# Retrain the packaged `mini` pipeline from scratch (CPU, about 50 min on one idle core; see docs/method/mini-world.md).
mini-weights: install
	$(BIN)/python -m apexcli.tools.mini_pretrain --out runs/mini-pretrain --export src/apexcli/models/mini --seed 0

clean:
	rm -rf $(VENV) runs .pytest_cache

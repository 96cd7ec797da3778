# Every target creates the environment it needs, so each is one command on a fresh machine.
# On a GPU machine, install the CUDA build of torch you want first, or set TORCH (e.g. TORCH=torch).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
RUN_NAME := demo-$(shell date +%Y%m%d-%H%M%S)
TOWER_STEPS ?= 1800
# the assistant's tower keeps the grey colour-free scenes its stages were tuned on (docs/experiments.md, 10.1), and
# fp32 like the stages (why: 11.1)
TOWER_WORLD := -o data.world.colour_free_fraction=0.3 -o data.world.colour_free_style=grey -o train.precision=fp32

.PHONY: setup browser demo demo-siglip demo-vlm test test-slow test-all bench bench-train bench-search bench-inference bench-vlm bench-serve parity-open-clip lint clean

setup: $(VENV)/.installed

# torch first: installed alone it takes the CPU build from local disk here, and `-e .` then finds it satisfied.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup  ## train the CLIP preset on the built-in world, evaluate, print the results
	$(BIN)/vlfm train configs/shapes-clip.yaml -o name=$(RUN_NAME)
	$(BIN)/vlfm info runs/$(RUN_NAME)

demo-siglip: setup
	$(BIN)/vlfm train configs/shapes-siglip.yaml -o name=siglip-$(RUN_NAME)

# The assistant: an image tower (the shapes-lit preset, shortened: it learns against the locked MiniLM text tower,
# so its shapes are sharp after few steps), then the VLM stages 0-2 on top of it, VQA on unseen scenes (eval.json),
# and a chat transcript about a newly rendered scene.
demo-vlm: setup  ## the LLaVA-style assistant on the built-in world (16-18 minutes on 2 cores)
	$(BIN)/vlfm train configs/shapes-lit.yaml -o name=tower-$(RUN_NAME) -o train.steps=$(TOWER_STEPS) \
		-o train.eval_every=0 -o train.save_every=0 $(TOWER_WORLD)
	$(BIN)/vlfm train configs/shapes-vlm.yaml -o name=vlm-$(RUN_NAME) -o model.vision_init=runs/tower-$(RUN_NAME)
	$(BIN)/vlfm chat runs/vlm-$(RUN_NAME) --scene 1 --save runs/vlm-$(RUN_NAME)/scene-1.png
	$(BIN)/vlfm chat runs/vlm-$(RUN_NAME) --image runs/vlm-$(RUN_NAME)/scene-1.png --prompt "describe the image."

# The web page's test drives Debian's chromium headless (playwright with that executable); installed once as root.
# Without it the test skips, except where VLFM_REQUIRE_BROWSER=1 (CI) makes that a failure.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
		|| echo "make browser: chromium could not be installed (not root?): the browser test skips (CI requires it)"

test: setup browser  ## fast tests (slow end-to-end runs are deselected)
	$(BIN)/python -m pytest -q

test-slow: setup  ## the slow end-to-end trainings (presets, the assistant) with their floors, two at a time
	$(BIN)/python -m pytest -q -m slow -n 2 --dist loadscope --durations=0

test-all: test test-slow  ## everything CI runs

# open_clip needs torchvision, which does not import beside torch 2.13.0, so the bench gets its own venv with a
# torch/torchvision pair that does (a CUDA build, fine on the CPU; pip takes it from local disk here).
# The pins go on every pip call so open_clip_torch and vlfm never swap torch for a newer release.
BENCH_VENV := .venv-bench
BENCH_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q $(BENCH_TORCH)
	$(BENCH_VENV)/bin/pip install -q $(BENCH_TORCH) open_clip_torch transformers
	$(BENCH_VENV)/bin/pip install -q $(BENCH_TORCH) -e .
	touch $@

# The CPU comparisons against peers, one after another (about 10 minutes on 2 cores): training steps (tiny and
# ViT-B/32 dimensions) against open_clip, encoding against open_clip and transformers, generation against
# transformers' LLaVA. The search bench (1M x 512, ~10 GB, ~9 minutes) is `make bench-search`.
bench: $(BENCH_VENV)/.installed  ## vlfm vs open_clip / transformers: training, encoding, generation (CPU)
	$(BENCH_VENV)/bin/python bench/train_step.py --steps 5 --rounds 3
	$(BENCH_VENV)/bin/python bench/train_step.py --size b32 --steps 1 --rounds 3 --warmup 1
	$(BENCH_VENV)/bin/python bench/inference.py --rounds 3
	$(BENCH_VENV)/bin/python bench/generate.py --rounds 3

bench-train: $(BENCH_VENV)/.installed  ## training samples/s against open_clip (flags: BENCH_ARGS="--size b32 --steps 2")
	$(BENCH_VENV)/bin/python bench/train_step.py $(BENCH_ARGS)

bench-search: setup  ## nearest-neighbour search, 1M x 512: IVF / HNSW / IVF-PQ against numpy brute force
	$(BIN)/python bench/search.py $(BENCH_ARGS)

bench-inference: $(BENCH_VENV)/.installed  ## encode_image / encode_text per s: vlfm's embedding path vs open_clip and transformers
	$(BENCH_VENV)/bin/python bench/inference.py $(BENCH_ARGS)

bench-vlm: setup  ## stage-2 step memory and tokens/s: full fine-tuning vs LoRA vs LoRA + gradient checkpointing
	$(BIN)/python bench/vlm_memory.py $(BENCH_ARGS)

bench-serve: setup  ## vlfm serve at 32 concurrent clients on loopback: batching on vs off (throughput, p50/p99)
	$(BIN)/python bench/serve.py $(BENCH_ARGS)

parity-open-clip: $(BENCH_VENV)/.installed  ## open_clip's own ViT-B models (random weights) loaded by vlfm: feature differences
	$(BENCH_VENV)/bin/python bench/open_clip_parity.py

lint: setup  ## ruff, and the import-linter layer contract (pyproject.toml)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-bench build src/*.egg-info .pytest_cache

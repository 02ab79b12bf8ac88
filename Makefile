# One virtual environment, two commands: `make serve` and `make test`.
# make serve SERVE_ARGS='--listen 127.0.0.1:6000 --max-in-flight 4'   (flags of python -m serving.stack)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GOLDEN ?= ../shared/golden

.PHONY: install proto test lint typecheck unit serve bench ablations clean

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and by exact version: the CPU build comes from the local disk, not a multi-GB download.
	$(PY) -m pip install --quiet torch==2.13.0
	# The SDK (client/) generates its gRPC stubs from proto/ as it is built; the server imports them too.
	$(PY) -m pip install --quiet -e ./client -e '.[test]'
	touch $(STAMP)

STUBS := client/omnigen2/v1/omnigen2_pb2.py

# Regenerate the stubs when proto/ changes (the install above makes them the first time).
$(STUBS): proto/omnigen2/v1/omnigen2.proto $(STAMP)
	$(PY) client/build_stubs.py

proto: $(STUBS)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	OMNIGEN2_GOLDEN=$(GOLDEN) $(VENV)/bin/pytest -q

test: lint typecheck unit

# The tiny golden checkpoint by default; CHECKPOINT=path/to/OmniGen2 serves another in the official layout.
CHECKPOINT ?= $(GOLDEN)/tiny-omnigen2

serve: $(STAMP) $(STUBS)
	$(PY) -m serving.stack --checkpoint $(CHECKPOINT) $(SERVE_ARGS)

# Benchmarks (benchmarks/README.md): BENCH_ARGS='--profile cpu-small' runs one profile.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.harness $(BENCH_ARGS)

# One performance change at a time, on the transformer in process (benchmarks/README.md).
ablations: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.ablations $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache

# One virtual environment, two commands: `make serve` and `make test`.
# make serve SERVE_ARGS='--listen 127.0.0.1:6000 --max-in-flight 4'   (flags of python -m serving.stack)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GOLDEN ?= ../shared/golden
# setuptools warns at every editable install that a folder named like the package may shadow it (here that folder is
# the package): only that warning is silenced; pip's errors and every other warning still show.
QUIET_EDITABLE := PYTHONWARNINGS='ignore:Editable installation'

.PHONY: install proto test lint typecheck unit browser serve demo bench ablations soak gpu-check clean

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# --no-compile: pip would byte-compile every installed module (torch's thousands; about 35 s of a fresh clone's
	# make test); Python compiles the ones imported, once, on first use.
	# torch first and by exact version: the CPU build comes from the local disk, not a multi-GB download.
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	# The SDK (client/) generates its gRPC stubs from proto/ as it is built; the server imports them too.
	# The safety extra (nudenet, AGPL-3.0) is installed here for the tests only: a deployment leaves it out unless it
	# means to run the safety stage (README, content safety).
	$(QUIET_EDITABLE) $(PY) -m pip install --quiet --no-compile -e ./client -e '.[test,safety]'
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

# Debian's headless Chromium and its driver, for the web UI's browser tests (installed once, as root, when missing).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# PYTEST_WORKERS=2 runs the tests in two pytest-xdist workers (in one process they keep about one of two cores busy:
# they wait on servers, subprocesses and timeouts much of the time): each test file whole in one worker, both sharing
# the session's ONNX export (tests/conftest.py). 0, the default, runs them in one process:
# under a heavily loaded machine some timing-bound tests failed with two workers (not yet shown reliable).
PYTEST_WORKERS ?= 0
# With workers each test file runs whole in one worker, so that a module's fixtures (its servers) start once, and
# the files go out in collection order: those that need the session's ONNX export last (tests/conftest.py).
XDIST := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist=loadfile --no-loadscope-reorder)

unit: $(STAMP) browser
	# The slowest tests are listed at the end, so a run that grows shows where (make test stays under ~10 min).
	OMNIGEN2_GOLDEN=$(GOLDEN) $(VENV)/bin/pytest -q --durations=30 $(XDIST)

# mypy (one core, about a minute with a fresh clone's empty cache) runs beside the tests, which leave a core idle
# much of the time, at the lowest priority: it takes only what they and their background export leave. Its report
# follows theirs; either failing fails the target. Stopping the target stops it too (sh leaves a background job deaf
# to Ctrl-C), and each run has its own log: runs in one tree at once would share it.
test: lint
	@mkdir -p build; log=$$(mktemp build/typecheck.XXXXXX); typecheck=; \
	trap '[ -z "$$typecheck" ] || kill $$typecheck 2>/dev/null; rm -f $$log' EXIT; trap 'exit 130' INT TERM; \
	nice -n 19 $(MAKE) --no-print-directory typecheck >$$log 2>&1 & typecheck=$$!; \
	$(MAKE) --no-print-directory unit; unit=$$?; \
	wait $$typecheck; typed=$$?; typecheck=; cat $$log; [ $$unit = 0 ] && [ $$typed = 0 ]

# The tiny golden checkpoint by default; CHECKPOINT=path/to/OmniGen2 serves another in the official layout.
CHECKPOINT ?= $(GOLDEN)/tiny-omnigen2

serve: $(STAMP) $(STUBS)
	$(PY) -m serving.stack --checkpoint $(CHECKPOINT) $(SERVE_ARGS)

# The web UI (client/omnigen2/webui, a Gradio client of the SDK) on http://127.0.0.1:7860, against a running API:
# `make serve`'s by default. make demo DEMO_ARGS='--server host:port --token T --tls --steps 20 --width 512 --height 512'
# (--port P: another page port). Gradio is installed once, again only when the SDK's pyproject or the venv changes.
WEBUI_STAMP := $(VENV)/.webui-installed

$(WEBUI_STAMP): $(STAMP) client/pyproject.toml
	$(QUIET_EDITABLE) $(PY) -m pip install --quiet -e './client[webui]'
	touch $@

demo: $(WEBUI_STAMP) $(STUBS)
	$(PY) -m omnigen2.webui $(DEMO_ARGS)

# Benchmarks (benchmarks/README.md): BENCH_ARGS='--profile cpu-small' runs one profile.
bench: $(STAMP)
	$(QUIET_EDITABLE) $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.harness $(BENCH_ARGS)

# One performance change at a time, on the transformer in process (benchmarks/README.md): the serving mechanisms,
# then the PyTorch fast path's switches (on CUDA when there is a GPU).
ablations: $(STAMP)
	$(QUIET_EDITABLE) $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.ablations $(BENCH_ARGS)
	$(PY) -m benchmarks.fast_path_ablations $(BENCH_ARGS)

# Soak / chaos check before a rollout (benchmarks/README.md): a seeded storm of random calls, cancels and killed
# clients for DURATION seconds, then the stack's invariants; exit status 1 when one fails. A stack of its own (tiny
# checkpoint, free ports) unless SOAK_ARGS points it at a running one: '--server H:P --http H:P --metrics URL
# --access-log FILE --max-in-flight N' (add --seed N to repeat a run's mix).
DURATION ?= 120

soak: $(STAMP) $(STUBS)
	$(PY) -m benchmarks.soak --duration $(DURATION) $(or $(SOAK_ARGS),--start)

# The GPU check (benchmarks/README.md). Here: the wheels and files the GPU machine lacks into .whl/ and .gpu-check/
# (git-ignored, 64 MiB with the tree at most), then the device command to run there and what it carries.
# SMOKE=1 runs the check itself on this CPU with the tiny model instead (tests/test_gpu_check.py does too).
gpu-check: $(STAMP) $(STUBS)
ifeq ($(SMOKE),1)
	$(PY) -m benchmarks.gpu_check --smoke --out build/gpu-check/smoke --work build/gpu-check/smoke-work \
		--processor $(GOLDEN)/tiny-omnigen2/processor
else
	$(PY) -m benchmarks.gpu_carry
endif

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache

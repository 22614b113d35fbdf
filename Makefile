# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the pinned dev dependencies.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.xray-ops-deps
# pytest workers (the Triton interpreter is single-threaded Python: use the cores)
JOBS   ?= 2

.PHONY: demo test install build info bench-quick clean

$(STAMP): requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $(STAMP)

# The Python package, editable; csrc/ is built separately so the build stays incremental.
install: $(STAMP)
	XRAY_OPS_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-deps --no-build-isolation -e .

# csrc/ -> xray_ops/_C*.so in place; ninja keeps objects under build/ (incremental).
# Skipped with a warning where nvcc or a CUDA build of torch is missing.
build: install
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m xray_ops info
	$(PY) -m pytest -q -n $(JOBS) --durations=15

# The main job: train the tiny reference model MAE -> hashtag -> CLIP with the fast ops, evaluate
# it (float / int8 / ToMe / EViT), measure ops=xray against ops=torch, write runs/demo/summary.json.
# Installs the Debian data packages when it can (root + apt-get), else uses synthetic data.
# No csrc/ build: the CPU runs numba / PyTorch kernels, a GPU the Triton ones.
DEMO_ARGS ?=
demo: install
	$(PY) -m reference_model.demo --out runs/demo $(DEMO_ARGS)

info: install
	$(PY) -m xray_ops info

clean:
	rm -rf build xray_ops/_C*.so *.egg-info

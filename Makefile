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

# The main job. Until the reference model lands: install, report, benchmark EViT.
demo: install
	$(PY) -m xray_ops info
	$(PY) -m bench evit_select --quick

info: install
	$(PY) -m xray_ops info

clean:
	rm -rf build xray_ops/_C*.so *.egg-info

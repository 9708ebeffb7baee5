# `make test` and `make demo` build .venv from nothing when it is missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip setuptools wheel
	$(VPY) -m pip install -e '.[test]'
	touch $@

test: venv
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# Two commands on a fresh machine with Python 3.11:  make demo  and  make test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean sample

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned and installed first with pip (it resolves offline from the local wheel cache).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e . $(TORCH)
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]' $(TORCH)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/cass demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

# Rebuild the shipped sample from ../shared/data (deterministic: same bytes every time).
sample: $(VENV)/.installed
	$(BIN)/python scripts/build_sample.py

clean:
	rm -rf $(VENV) runs .pytest_cache

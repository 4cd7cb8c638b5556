# make run   - create .venv if missing, install, run the whole pipeline on the tiny preset
# make test  - same bootstrap, then the test suite (what CI runs, after make lint)
# make lint  - ruff: style, imports, and the import boundaries between folders (docs/architecture.md)
# make test-fast - the tests without Ray fits or whole-pipeline runs (a couple of minutes)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gptflow-installed

.PHONY: install run test test-fast lint docs bench clean

install: $(STAMP)

# torch first, from the pinned CPU build (otherwise a dependency would pull the multi-GB CUDA build),
# then the project with every package pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/gptflow run --preset tiny

test: install
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not e2e and not ray and not slow"

lint: install
	$(BIN)/ruff check .

docs: docs/architecture.svg

docs/architecture.svg: docs/architecture.dot
	dot -Tsvg $< -o $@

bench: install
	$(BIN)/python -m bench.tokenizer
	$(BIN)/python -m bench.pretrain
	$(BIN)/python -m bench.step
	$(BIN)/python -m bench.data
	$(BIN)/python -m bench.extraction
	$(BIN)/python -m bench.data_counts

clean:
	rm -rf .gptflow

# Two commands on a fresh machine:  `make train` (a real job, offline)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install train test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Train the seed CNN on scikit-learn's bundled digits (no download, ~10 s on 2 cores).
train: $(STAMP)
	$(BIN)/regsweep train studies/base/digits_cnn.yaml --out runs/digits_cnn

# Everything but the benchmark-scale tests. pytest's exit 5 (no tests collected) is a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs *.egg-info

# Two commands on a fresh machine:  `make sweep` (a real sweep, offline, SQLite)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sweep dashboard report train lint test test-fast test-all bench clean

EXTRAS := dev,ray,trackers,grpc
# pip's own configuration on this machine (`pip config list`: index-url, extra-index-url, find-links, constraint,
# from pip.conf files and $PIP_* variables) as uv's flags, so both installers see the same packages and caps.
define UV_FLAGS_PY
import shlex, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
flags = []
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in ("index-url", "extra-index-url", "find-links", "constraint"):
        for v in value.strip().strip("'\"").split():
            if v not in flags:
                flags += [f"--{name}", v]
print(shlex.join(flags))
endef
export UV_FLAGS_PY

# The environment. uv installs it (parallel unpacking, hard links from its cache: ~45 s instead of pip's ~140 s
# for torch's 6.6 GB of CUDA wheels), choosing versions as pip would (best match over every index) and compiling
# bytecode (with $$PYTHONDONTWRITEBYTECODE set, a package without .pyc files is compiled anew by every process:
# `import torch` 5.9 s instead of 1.5 s). Where uv cannot be installed or fails, pip installs instead.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	{ $(BIN)/python -m pip install -q uv \
	  && $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --index-strategy unsafe-best-match \
	     $$($(BIN)/python -c "$$UV_FLAGS_PY") -e '.[$(EXTRAS)]'; } \
	|| { echo "uv failed: installing with pip"; $(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'; }
	touch $@

install: $(STAMP)

# The demo sweep: 20 trials over the regularisation space on sklearn's digits, into studies/regsweep.db.
sweep: $(STAMP)
	$(BIN)/regsweep run studies/digits_cnn.yaml

# Browse the demo study: optuna-dashboard on http://127.0.0.1:8080/dashboard/, or a static HTML report.
dashboard: $(STAMP)
	$(BIN)/regsweep dashboard

report: $(STAMP)
	mkdir -p runs
	$(BIN)/regsweep report --study-name digits_cnn --out runs/report
	@echo "open runs/report/index.html"

# Train the seed CNN on scikit-learn's bundled digits (no download, ~10 s on 2 cores).
train: $(STAMP)
	$(BIN)/regsweep train studies/base/digits_cnn.yaml --out runs/digits_cnn

lint: $(STAMP)
	$(BIN)/python -m ruff check .

# Tiers (markers, pyproject.toml): db, procs, ray, browser, bench, slow. `make test` = lint + every tier but slow
# (the README's test command, run by .ci/run); `make test-fast` = no servers, subprocesses, Ray, browser or
# benchmarks; `make test-all` = lint + everything. Extra pytest arguments: make test PYTEST_ARGS="--durations=25".
# pytest's exit 5 (no tests collected in either half) is a failure.
# pytest runs as two processes at once (tests/run_tiers.sh): one runs the tests that start processes, time
# heartbeats or share the Ray session (procs, ray, browser, slow), one after another; the other runs the rest;
# then the `timing` tests (wall-clock comparisons) run alone.
FAST := not db and not procs and not ray and not browser and not bench and not slow
define pytest
	tests/run_tiers.sh $(BIN)/python '$(1)' $(PYTEST_ARGS)
endef

test: lint
	$(call pytest,not slow)

test-fast: $(STAMP)
	$(call pytest,$(FAST))

test-all: lint
	$(call pytest,)

bench: $(STAMP)
	$(BIN)/python benchmarks/sweep_overhead.py --quick
	$(BIN)/python benchmarks/train_overhead.py --quick

clean:
	rm -rf $(VENV) runs *.egg-info

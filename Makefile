# Two commands do all the set-up on a fresh machine with Python 3.11+ and make:
#   make run    start the daemon on its embedded defaults
#   make test   run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Wheels of everything licd and licd-client depend on, so that
# tests/integration/test_client_wheel.py installs them into fresh environments offline.
WHEELHOUSE := $(VENV)/wheelhouse

.PHONY: run test test-ha lint check bench wheels client-wheel clean

# licd and licd-client are two distributions of this one tree (wheels/licd-client holds
# the client's), installed editable together. An older licd owned the licd-client
# command itself: uninstalling it first lets the client take the command over.
$(STAMP): pyproject.toml setup.py wheels/licd-client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip uninstall --yes -qq licd
	$(BIN)/pip install --quiet -e wheels/licd-client -e '.[dev]'
	$(BIN)/pip download --quiet --no-build-isolation --prefer-binary \
		--dest $(WHEELHOUSE) ./wheels/licd-client .
	touch $(STAMP)

# The embedded defaults, always: a LICD_CONFIG exported for the admin commands does not
# turn `make run` into the daemon of that file (ARGS="--config FILE" does).
run: $(STAMP)
	env -u LICD_CONFIG $(BIN)/licd serve $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(ARGS)

# The high-availability tests alone (docs/ha.md): real nodes on a throwaway PostgreSQL
# (Debian's postgresql package); `make test` runs them too.
test-ha: $(STAMP)
	$(BIN)/pytest tests/integration/test_ha.py tests/integration/test_store_backends.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

# dist/licd_client-VERSION-py3-none-any.whl: the client library and `licd-client` alone
# (msgpack and PyNaCl only), for vendors who embed the client. `make wheels` builds it
# and dist/licd-VERSION-py3-none-any.whl, the daemon, which requires it.
client-wheel: $(STAMP)
	$(BIN)/python wheels/build_wheels.py client

wheels: $(STAMP)
	$(BIN)/python wheels/build_wheels.py all

# Benchmarks: by hand only, never in CI (see benchmarks/README.md). ARGS=--quick for a
# short run; results in benchmarks/results/latest.json.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist *.egg-info \
		wheels/licd-client/*.egg-info

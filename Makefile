# The two set-up commands: `make demo` and `make test`. Both create .venv when missing and
# install exactly what requirements/dev.lock pins (with hashes), so a fresh machine gets what CI got.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements/dev.lock
# Installed again after the lock: xds-protos ships older copies of these modules (requirements/lock.py).
OVERLAY := requirements/overlay.lock
# --ignore-requires-python: opa-golib-python-bindings claims Python 3.14 and runs on 3.11 (requirements/lock.py).
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: demo test bench evaluate install lock clean

$(STAMP): $(LOCK) $(OVERLAY) pyproject.toml setup.py $(wildcard protos/*.proto) $(wildcard authz_server/*.c) oidc-provider/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --ignore-requires-python -r $(LOCK)
	$(PIP) install --quiet --require-hashes --no-deps --force-reinstall -r $(OVERLAY)
	# setuptools warns on every editable install about same-named folders in the working directory; it is how
	# this checkout is meant to be used (tests import the tree), so that one warning is silenced here.
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install --quiet --no-deps --no-build-isolation -e .
	# The real OpenID provider of the e2e tests and `demo --idp oidc-provider`, from its lock.
	if command -v npm >/dev/null 2>&1; then cd oidc-provider && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: tests that need oidc-provider will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/authz-server demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m tests.bench

evaluate: $(STAMP)
	$(BIN)/authz-server evaluate --out evaluation

# Re-resolve pyproject.toml into requirements/*.lock (needs PyPI) and print what changed.
lock:
	test -x .venv-lock/bin/python || $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check 'pip-tools==7.7.0'
	.venv-lock/bin/python requirements/lock.py

clean:
	rm -rf $(VENV) .venv-lock .authz build *.egg-info oidc-provider/node_modules

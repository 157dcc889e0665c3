# The two set-up commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench evaluate install clean

$(STAMP): pyproject.toml setup.py $(wildcard protos/*.proto) $(wildcard authz_server/*.c) oidc-provider/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo,evaluate]'
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

clean:
	rm -rf $(VENV) .authz build *.egg-info oidc-provider/node_modules

# Two commands on a fresh Debian machine: `make demo` and `make test`.
# Both run `make setup` first, which is idempotent: a second run installs nothing.

PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: setup system demo test lint lock clean

setup: system $(STAMP)

system:
	@scripts/setup-system.sh

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,deploy]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/recs demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy common serving speed_layer spark_jobs dags warehouse recs evaluation bench

test: lint
	scripts/pytest.sh

# Re-pin every dependency after changing pyproject.toml (needs network).
lock:
	rm -rf /tmp/lambdarec-lock && $(PY) -m venv /tmp/lambdarec-lock
	/tmp/lambdarec-lock/bin/pip install --quiet -e '.[dev,deploy]'
	( echo '# The lock: every package pinned. Regenerate with `make lock` after changing pyproject.toml.'; \
	  /tmp/lambdarec-lock/bin/pip freeze --exclude-editable | grep -v '^-e' ) > constraints.txt

clean:
	rm -rf $(VENV) var

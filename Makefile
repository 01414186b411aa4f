# Every target creates .venv and installs the project into it when missing, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# postfix's smtp-sink, fetched once into .cache (scripts/smtp-sink.sh): the email notifier's tests and bench use it.
SINK := .cache/postfix/usr/sbin/smtp-sink
# Debian's chromium and its driver, for the browser tests (tests/browser.py); `make chromium` installs them if missing.
CHROMIUM := /usr/bin/chromium /usr/bin/chromedriver
# Debian's wrk, the load of `make bench`'s cm serve figures (bench/serve.py), installed by `make bench` if missing.
WRK := /usr/bin/wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint format bench example clean chromium wrk

# The example plugin is installed as an outsider installs theirs, so its tests go through its entry point.
$(STAMP): pyproject.toml examples/cm-sms-gateway/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e examples/cm-sms-gateway
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

$(SINK):
	bash scripts/smtp-sink.sh fetch

# Nothing to do (and nothing printed) when both are there; otherwise one `apt-get update`, then the install.
chromium:
	@for f in $(CHROMIUM); do test -x $$f || missing=1; done; \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver; \
	fi

wrk:
	@test -x $(WRK) || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk; }

test: lint $(SINK)
	$(BIN)/pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench examples
	$(BIN)/ruff format src tests bench examples

bench: $(STAMP) $(SINK) wrk
	$(BIN)/python -m bench

# campaign.toml.example is generated from the settings' declarations (cm's and the built-in notifiers'); a test
# fails while it differs.
example: $(STAMP)
	$(BIN)/python -m campaign_manager.config campaign.toml.example

clean:
	rm -rf $(VENV) build dist src/*.egg-info examples/*/src/*.egg-info .mypy_cache .ruff_cache .hypothesis

# Two commands: `make run` (demo on 127.0.0.1:8000) and `make test` (lint, types, the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
	REDIS_URL=redis://127.0.0.1:6379/15 \
	CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672//
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install lint types test-embedded test-services test-services-log migrate seed bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-installs whenever pyproject.toml changes, so a stale .venv never hides a missing dependency.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(BIN)/python manage.py migrate --noinput

seed: migrate
	$(BIN)/python manage.py seed_demo --host $(HOST) --port $(PORT)

run: seed
	@echo ""
	@echo "  Admin (control plane): http://$(HOST):$(PORT)/admin/"
	@echo "  Demo endpoint (the API key seed_demo printed above, also in $${VAR_DIR:-var}/demo-api-key):"
	@echo "    curl -X POST http://$(HOST):$(PORT)/demo/completions \\"
	@echo "      -H \"Authorization: Bearer \$$(cat $${VAR_DIR:-var}/demo-api-key)\" -H 'X-Tenant-ID: acme-chat-key-1' \\"
	@echo "      -d '{\"prompt\": \"hello metered world\"}'"
	@echo "  Usage:                 $(BIN)/python manage.py usage --tree"
	@echo ""
	$(BIN)/python manage.py runserver $(HOST):$(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: install
	$(BIN)/mypy .

test-embedded: install
	env -u DATABASE_URL -u REDIS_URL -u CELERY_BROKER_URL $(BIN)/pytest

# PostgreSQL + Redis + RabbitMQ. Skipped when they are unreachable, except under CI=true where that fails.
test-services: install
	@if $(BIN)/python -m tests.services postgres redis rabbitmq; then \
		$(SERVICES_ENV) $(BIN)/pytest; \
	elif [ "$$CI" = "true" ]; then \
		echo "CI=true: PostgreSQL, Redis and RabbitMQ must be reachable" >&2; exit 1; \
	else \
		echo "SKIPPED the PostgreSQL + Redis run: services unreachable"; \
	fi

# The same services run in log mode (METERING WRITE_MODE="log", each append drained at once: tests/settings.py).
test-services-log: install
	@if $(BIN)/python -m tests.services postgres redis rabbitmq; then \
		$(SERVICES_ENV) TEST_WRITE_MODE=log $(BIN)/pytest; \
	elif [ "$$CI" = "true" ]; then \
		echo "CI=true: PostgreSQL, Redis and RabbitMQ must be reachable" >&2; exit 1; \
	else \
		echo "SKIPPED the log-mode PostgreSQL + Redis run: services unreachable"; \
	fi

test: lint types test-embedded test-services test-services-log

bench: install
	$(BIN)/python bench/usage_read.py

clean:
	rm -rf $(VENV) var build *.egg-info

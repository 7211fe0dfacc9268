# Smart energy platform: every task a user runs. `make help` lists them.
SHELL := bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard common/energy/v1/*.proto)
COMPOSE := docker compose -f deployments/docker-compose.yml
# grpcurl and redis_exporter are built by scripts/services.sh into Go's bin folder.
export PATH := $(VENV)/bin:$(shell go env GOPATH 2>/dev/null || echo $(HOME)/go)/bin:$(PATH)

# make simulate DEVICES=100 RATE=500 DURATION=30
DEVICES ?= 50
RATE ?= 200
DURATION ?= 30
TARGET ?= 127.0.0.1:50051
CATALOG ?= deployments/tariffs.yaml
# The gateway's admin token for make dev and make up, generated once into .admin-token
# (git-ignored). The client scripts send it as GATEWAY_TOKEN, so it may send for any device.
ADMIN_TOKEN_FILE := .admin-token
ADMIN_TOKEN = $(shell cat $(ADMIN_TOKEN_FILE))
# RabbitMQ's password in docker compose (user energy), generated once into .rabbitmq-password
# (git-ignored). The broker keeps the user in its volume: a new password needs make down-delete-data.
RABBITMQ_PASSWORD_FILE := .rabbitmq-password
# Compose interpolates both secrets for every command, down included.
COMPOSE_SECRETS := $(ADMIN_TOKEN_FILE) $(RABBITMQ_PASSWORD_FILE)
dev up down down-delete-data: export GATEWAY_ADMIN_TOKEN = $(ADMIN_TOKEN)
up down down-delete-data: export RABBITMQ_PASSWORD = $(shell cat $(RABBITMQ_PASSWORD_FILE))
simulate import reconcile bench bench-import: export GATEWAY_TOKEN ?= $(ADMIN_TOKEN)

.PHONY: help install proto openapi services services-stop services-delete-data browser dev seed close-period import simulate reconcile dlq dlq-replay test-faults bench bench-tools helm-tools bench-import bench-auth bench-billing bench-soak test test-unit lint fmt up down down-delete-data compose-check clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install the project with its dev tools

# google/api/annotations.proto and http.proto (the HTTP routes on the Gateway RPCs) come with
# googleapis-common-protos, a runtime dependency: its stubs are what the generated ones import.
GOOGLEAPIS_PROTOS = $(shell $(PY) -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parent.parent)' 2>/dev/null)

proto: install ## Generate the Python stubs from common/energy/v1/*.proto
	$(PY) -m grpc_tools.protoc -I . -I $(GOOGLEAPIS_PROTOS) --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

openapi: proto ## Regenerate api_gateway/http/openapi.json (the HTTP API) from the protos
	$(PY) -m scripts.openapi

$(ADMIN_TOKEN_FILE):
	umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_hex(32))' > $@
	@echo "generated the gateway's admin token in $@ (grpcurl -H \"authorization: Bearer \$$(cat $@)\" ...)"

$(RABBITMQ_PASSWORD_FILE):
	umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_hex(24))' > $@
	@echo "generated RabbitMQ's password for make up in $@ (user energy)"

services: ## Install (when missing) and start RabbitMQ, Redis, SecantusDB (MongoDB wire), Prometheus, grpcurl locally
	bash scripts/services.sh

services-stop: ## Stop what make services started (RabbitMQ, Redis, SecantusDB, Prometheus, redis_exporter); data kept
	bash scripts/services.sh stop

services-delete-data: ## Stop them and delete their data: make dev's readings and bills, queued readings, Prometheus history
	bash scripts/services.sh delete-data

browser: ## Install (when missing) Debian's chromium and chromium-driver for the browser tests
	bash scripts/browser.sh

dev: proto services $(ADMIN_TOKEN_FILE) ## Run the four services as local processes (Ctrl-C stops them)
	$(PY) -m scripts.seed --if-empty $(CATALOG)
	@# Readable log lines for a person at a terminal, JSON lines for a pipe or a file.
	LOG_FORMAT=$${LOG_FORMAT:-$$([ -t 1 ] && echo text || echo json)} \
		honcho -f deployments/Procfile.dev -d . start

seed: install ## Load tariffs, accounts and devices into MongoDB: CATALOG (deployments/tariffs.yaml)
	$(PY) -m scripts.seed $(CATALOG)

close-period: install ## Issue the bills of an ended month: PERIOD=YYYY-MM [ACCOUNT=id] (billing's MONGODB_URL, MONGODB_DATABASE)
	@test -n "$(PERIOD)" || { echo "usage: make close-period PERIOD=YYYY-MM [ACCOUNT=id]"; exit 2; }
	$(PY) -m billing_service.close_period $(PERIOD) $(if $(ACCOUNT),--account $(ACCOUNT))

import: install $(ADMIN_TOKEN_FILE) ## Send a CSV through SendReadings: CSV=path [DEVICE=id] [TIME_ZONE=Europe/Oslo]
	@test -n "$(CSV)" || { echo "usage: make import CSV=path [DEVICE=id] [TIME_ZONE=zone]"; exit 2; }
	$(PY) -m scripts.import_csv $(CSV) --target $(TARGET) $(if $(DEVICE),--device $(DEVICE)) $(if $(TIME_ZONE),--time-zone $(TIME_ZONE))

bench-import: install $(ADMIN_TOKEN_FILE) ## Import 1,000,000 generated rows into a running gateway: rows/s, peak RSS
	$(PY) -m scripts.bench import --rows 1000000 --target $(TARGET)

simulate: install $(ADMIN_TOKEN_FILE) ## Virtual loggers: DEVICES, RATE (readings/s), DURATION (s), LEDGER (JSONL of acks)
	$(PY) -m scripts.simulate --devices $(DEVICES) --rate $(RATE) --duration $(DURATION) --target $(TARGET) $(if $(LEDGER),--ledger $(LEDGER) --resend-for-s 120)

reconcile: install $(ADMIN_TOKEN_FILE) ## Check a ledger's readings and bills against billing: LEDGER=path, CATALOG
	@test -n "$(LEDGER)" || { echo "usage: make reconcile LEDGER=path.jsonl [CATALOG=tariffs.yaml]"; exit 2; }
	$(PY) -m scripts.reconcile $(LEDGER) --catalog $(CATALOG) --target $(TARGET) --wait-s 30

dlq: install ## List dead-lettered messages with their reasons (they stay in the queue)
	$(PY) -m scripts.dlq list

dlq-replay: install ## Replay dead letters once their cause is fixed: IDS="id1 id2" or IDS=--all
	@test -n "$(IDS)" || { echo "usage: make dlq-replay IDS=\"id1 id2\" (or IDS=--all)"; exit 2; }
	$(PY) -m scripts.dlq replay $(IDS)

test-faults: proto services ## Only the fault tests: kills, broker and store outages under load
	$(PY) -m pytest tests/faults

bench-tools: ## Install (when missing) the load tools make bench drives: ghz and PerfTest
	bash scripts/bench_tools.sh

helm-tools: ## Install (when missing) helm and kubeconform, built from the Go module proxy (chart tests)
	bash scripts/helm_tools.sh

bench: proto services bench-tools $(ADMIN_TOKEN_FILE) ## Broker baseline, streaming, unary (ghz), devices, RSS: table + bench-results.json [BENCH_ARGS=--quick]
	$(PY) -m scripts.bench all --target $(TARGET) $(BENCH_ARGS)

bench-auth: proto services ## What device auth and Redis rate limits cost per reading (gateway as a process)
	$(PY) -m scripts.bench auth --calls 3000

bench-soak: proto services ## 1,000,000 readings through a stack of its own: every service's RSS after each 100,000 and once all are billed (15-18 minutes)
	$(PY) -m scripts.bench soak $(BENCH_ARGS)

bench-billing: proto services ## How fast billing drains a queue of 5,000 readings into MongoDB and Redis [BENCH_BILLING_ARGS=--profile billing.txt]
	$(PY) -m scripts.bench billing $(BENCH_BILLING_ARGS)

# In a random order (pytest-randomly prints the seed): PYTEST_ARGS=--randomly-seed=N repeats
# one, PYTEST_ARGS="-p no:randomly" keeps the files' order.
test: proto services browser bench-tools helm-tools ## Everything, in random order: unit, component (real servers), end to end, compose checks
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

test-unit: proto ## Only the tests that need no server
	$(PY) -m pytest tests/unit

lint: install ## ruff check and format check, hadolint on the Dockerfile
	ruff check .
	ruff format --check .
	hadolint deployments/Dockerfile

fmt: install ## Format and fix what ruff can
	ruff format .
	ruff check --fix .

compose-check: install ## Validate deployments/docker-compose.yml against the compose specification
	check-jsonschema --builtin-schema vendor.compose-spec deployments/docker-compose.yml

up: $(COMPOSE_SECRETS) ## The whole stack in docker compose (needs Docker)
	$(COMPOSE) up -d --build --wait
	@echo "gateway grpc://localhost:50051  HTTP and web page http://localhost:8080  RabbitMQ UI http://localhost:15672 (user energy, password in $(RABBITMQ_PASSWORD_FILE))  analytics http://localhost:9100/metrics"

down: $(COMPOSE_SECRETS) ## Stop the compose stack; its volumes (bills, queues, metrics) are kept
	$(COMPOSE) down

down-delete-data: $(COMPOSE_SECRETS) ## Stop the compose stack and delete its volumes: every bill and queued reading
	$(COMPOSE) down -v

clean: ## Remove the virtual environment, generated stubs and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
	rm -f common/energy/v1/*_pb2*.py common/energy/v1/*_pb2*.pyi
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

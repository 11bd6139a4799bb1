# Container targets for a GPU host (Docker Engine + Compose v2 + NVIDIA container toolkit).
# Included by the Makefile. Every target runs the services of docker-compose.gpu.yml, i.e. the
# same `distill ...` command lines the CPU tests exercise.
#   make up            build the images, run generate -> train -> merge, then serve + monitoring
#   make ps / logs     what runs; follow the logs (SERVICE=vllm for one service)
#   make down          stop everything (volumes with runs, caches and metrics are kept)
#   make train-gpu     one stage on its own (its input must exist; nothing else is started):
#                      generate-gpu (or generate-local-gpu), train-gpu, merge-gpu, serve-gpu, ...
#   make ui-up         Open WebUI (profile ui) on the running gateway
#   make up GPU_COMPOSE_OVERRIDES=compose/replicas.yml    two vLLM replicas behind the gateway
# RUN_ONCE_FORCE=1 (in .env or the environment) redoes a finished stage.

DOCKER_COMPOSE ?= docker compose
GPU_COMPOSE_FILE ?= docker-compose.gpu.yml
GPU_COMPOSE_OVERRIDES ?=
DC = $(DOCKER_COMPOSE) -f $(GPU_COMPOSE_FILE) $(addprefix -f ,$(GPU_COMPOSE_OVERRIDES))
CONTAINERS_VENV_BIN ?= .venv/bin
SERVICE ?=

.PHONY: up down logs ps images generate-gpu generate-local-gpu train-gpu merge-gpu serve-gpu \
	gateway-gpu eval-gpu ui-up monitoring-up lint-containers lock

# A fresh random secret (hex) from the kernel's generator.
SECRET_CMD = od -An -tx1 -N24 /dev/urandom | tr -d ' \n'

# .env from .env.example with fresh secrets: one gateway key (Open WebUI uses the same one) and
# Grafana's admin password. The teacher key is yours to add.
.env:
	@umask 077; key=$$($(SECRET_CMD)); pw=$$($(SECRET_CMD)); \
	sed -e "s/^GATEWAY_API_KEYS=$$/GATEWAY_API_KEYS=sk-$$key/" \
	    -e "s/^UI_GATEWAY_KEY=$$/UI_GATEWAY_KEY=sk-$$key/" \
	    -e "s/^GRAFANA_ADMIN_PASSWORD=$$/GRAFANA_ADMIN_PASSWORD=$$pw/" .env.example > .env
	@echo "Created .env (mode 0600) with a gateway key and a Grafana password: set TEACHER_API_KEY (and review the rest), then run make up again."
	@false

up: .env
	@echo "$${COMPOSE_PROFILES:-$$(grep -E '^COMPOSE_PROFILES=' .env | cut -d= -f2)}" \
		| grep -Eq '(^|,)(api|local)-teacher(,|$$)' \
		|| { echo "COMPOSE_PROFILES (in .env) must name api-teacher or local-teacher: which generate runs" >&2; exit 2; }
	@echo "Starting; this waits for generate -> train -> merge -> vLLM (hours for a 7B)."
	@echo "Follow it from another terminal: make logs (or make logs SERVICE=train)."
	$(DC) up --build --detach
	@echo "gateway: http://localhost:$$(grep -E '^GATEWAY_PORT=' .env | cut -d= -f2)/v1   grafana: http://localhost:$$(grep -E '^GRAFANA_PORT=' .env | cut -d= -f2)"

down:
	$(DC) down

logs:
	$(DC) logs --follow $(SERVICE)

ps:
	$(DC) ps --all

images: .env
	$(DC) build

# `run` always with --no-deps: without it Compose starts the whole chain before the stage.
generate-gpu: .env
	$(DC) run --rm --no-deps generate

generate-local-gpu: .env
	$(DC) run --rm --no-deps generate-local

train-gpu: .env
	$(DC) run --rm --no-deps train

merge-gpu: .env
	$(DC) run --rm --no-deps merge

serve-gpu: .env
	$(DC) up --detach --no-deps vllm

gateway-gpu: .env
	$(DC) up --detach --no-deps gateway

eval-gpu: .env
	$(DC) run --rm --no-deps eval

ui-up: .env
	$(DC) --profile ui up --detach --no-deps open-webui

monitoring-up: .env
	$(DC) up --detach --no-deps prometheus grafana

# Static checks of everything container-shaped (no Docker engine needed); CI runs them through
# tests/test_compose.py, test_images.py, test_prometheus.py and test_dashboard.py as well.
lint-containers:
	$(CONTAINERS_VENV_BIN)/hadolint images/*/Dockerfile
	$(CONTAINERS_VENV_BIN)/docker-compose -f $(GPU_COMPOSE_FILE) --env-file .env.example config --quiet
	$(CONTAINERS_VENV_BIN)/docker-compose -f $(GPU_COMPOSE_FILE) --env-file .env.example \
		--profile local-teacher --profile eval --profile ui config --quiet
	$(CONTAINERS_VENV_BIN)/docker-compose -f $(GPU_COMPOSE_FILE) -f compose/replicas.yml \
		--env-file .env.example config --quiet
	promtool check config compose/prometheus/prometheus.yml
	promtool check config compose/prometheus/prometheus-replicas.yml

# Re-pin images/<stage>/requirements.lock after changing pyproject.toml.
lock:
	$(CONTAINERS_VENV_BIN)/python images/lock.py

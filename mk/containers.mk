# Container targets for a GPU host (Docker Engine + Compose v2 + NVIDIA container toolkit).
# Included by the Makefile. Every target runs the services of docker-compose.gpu.yml, i.e. the
# same `distill ...` command lines the CPU tests exercise.
#   make up            build the images, run generate -> train -> merge, then serve + monitoring
#   make ps / logs     what runs; follow the logs (SERVICE=vllm for one service)
#   make down          stop everything (volumes with runs, caches and metrics are kept)
#   make train-gpu     one stage on its own (its input must exist): generate-gpu, train-gpu, ...
#   make up GPU_COMPOSE_OVERRIDES=compose/replicas.yml    two vLLM replicas behind the gateway

DOCKER_COMPOSE ?= docker compose
GPU_COMPOSE_FILE ?= docker-compose.gpu.yml
GPU_COMPOSE_OVERRIDES ?=
DC = $(DOCKER_COMPOSE) -f $(GPU_COMPOSE_FILE) $(addprefix -f ,$(GPU_COMPOSE_OVERRIDES))
CONTAINERS_VENV_BIN ?= .venv/bin
SERVICE ?=

.PHONY: up down logs ps images generate-gpu train-gpu merge-gpu serve-gpu gateway-gpu eval-gpu \
	monitoring-up lint-containers lock

.env:
	cp .env.example .env
	@echo "Created .env from .env.example: set TEACHER_API_KEY (and review the rest), then run make up again."
	@false

up: .env
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

generate-gpu: .env
	$(DC) run --rm --no-deps generate

train-gpu: .env
	$(DC) run --rm --no-deps train

merge-gpu: .env
	$(DC) run --rm --no-deps merge

serve-gpu: .env
	$(DC) up --detach --no-deps vllm

gateway-gpu: .env
	$(DC) up --detach --no-deps gateway

eval-gpu: .env
	$(DC) --profile eval run --rm eval

monitoring-up: .env
	$(DC) up --detach --no-deps prometheus grafana

# Static checks of everything container-shaped (no Docker engine needed); CI runs them through
# tests/test_compose.py, test_images.py, test_prometheus.py and test_dashboard.py as well.
lint-containers:
	$(CONTAINERS_VENV_BIN)/hadolint images/*/Dockerfile
	$(CONTAINERS_VENV_BIN)/docker-compose -f $(GPU_COMPOSE_FILE) --env-file .env.example config --quiet
	$(CONTAINERS_VENV_BIN)/docker-compose -f $(GPU_COMPOSE_FILE) -f compose/replicas.yml \
		--env-file .env.example config --quiet
	promtool check config compose/prometheus/prometheus.yml
	promtool check config compose/prometheus/prometheus-replicas.yml

# Re-pin images/<stage>/requirements.lock after changing pyproject.toml.
lock:
	$(CONTAINERS_VENV_BIN)/python images/lock.py

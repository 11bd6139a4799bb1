# Kubernetes targets (k8s/, kustomize). Included by the Makefile. Kubernetes has no depends_on:
# `make k8s-up` applies one stage at a time (objects carry the label distill.stage) and waits
# for each before the next, as compose's job chain does:
#   infra (namespace, volumes, settings, policies, dashboard) -> generate -> train -> merge
#   -> serve (vLLM, gateway, monitoring)
# A Job that already exists is not applied again (delete it to redo its stage; the run-once
# wrapper still skips a stage whose outputs are on the volume, unless RUN_ONCE_FORCE=1).
#   make k8s-up [K8S_OVERLAY=multi-gpu]   the whole chain
#   make k8s-secrets                      create the Secrets from TEACHER_API_KEY, HF_TOKEN and
#                                         GATEWAY_KEYS_FILE in your environment (README)
#   make k8s-status / k8s-down            what runs; delete all but the volumes and the settings
#   make k8s-render / k8s-lint            print an overlay; checkov on it (offline)

KUBECTL ?= kubectl
K8S_OVERLAY ?= single-gpu
K8S_DIR ?= k8s/overlays/$(K8S_OVERLAY)
K8S_NS ?= distill
# how long one stage may take, in minutes (a 7B LoRA run takes hours)
K8S_JOB_MINUTES ?= 2880
K8S_SERVE_TIMEOUT ?= 30m
K8S = $(KUBECTL) -n $(K8S_NS)
K8S_APPLY = $(KUBECTL) apply -k $(K8S_DIR) -l
# the overlay trains with a JobSet (several nodes) or a Job (one node)
K8S_TRAIN = $(shell $(KUBECTL) kustomize $(K8S_DIR) | grep -q '^kind: JobSet' && echo jobset/train || echo job/train)

# checkov pins packaging, networkx and python-dateutil below the project venv's: its own venv
CHECKOV_VENV ?= .venv-checkov
CHECKOV_LOCK := tests/k8s/checkov.lock
CHECKOV_STAMP := $(CHECKOV_VENV)/.setup-done

.PHONY: k8s-up k8s-infra k8s-secrets k8s-check-secrets k8s-generate k8s-train k8s-merge \
	k8s-serve k8s-status k8s-down k8s-render k8s-lint

# `make setup` and the tests need checkov's venv as well
setup test test-fast: $(CHECKOV_STAMP)

$(CHECKOV_STAMP): $(CHECKOV_LOCK)
	test -x $(CHECKOV_VENV)/bin/python || python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --no-deps --requirement $(CHECKOV_LOCK)
	touch $@

# Run a stage's Job (or JobSet) unless it exists, then wait until it completes; fail as soon as
# it fails. $(1): resource, $(2): stage, $(3): its success condition.
define k8s_job
	@if $(K8S) get $(1) >/dev/null 2>&1; then \
	  echo "$(1) exists: waiting for it (kubectl -n $(K8S_NS) delete $(1) to run it again)"; \
	else $(K8S_APPLY) distill.stage=$(2); fi
	@echo "waiting for $(1) (logs: kubectl -n $(K8S_NS) logs -f -l app.kubernetes.io/name=$(2))"
	@n=0; until $(K8S) wait --for=condition=$(3) --timeout=60s $(1) >/dev/null 2>&1; do \
	  if $(K8S) wait --for=condition=Failed --timeout=1s $(1) >/dev/null 2>&1; then \
	    echo "$(1) failed: kubectl -n $(K8S_NS) describe $(1)" >&2; exit 1; fi; \
	  n=$$((n + 1)); if [ $$n -ge $(K8S_JOB_MINUTES) ]; then \
	    echo "$(1): not done after $(K8S_JOB_MINUTES) minutes" >&2; exit 1; fi; \
	done
	@echo "$(1) complete"
endef

k8s-up:
	@$(MAKE) --no-print-directory k8s-infra
	@$(MAKE) --no-print-directory k8s-check-secrets
	@$(MAKE) --no-print-directory k8s-generate
	@$(MAKE) --no-print-directory k8s-train
	@$(MAKE) --no-print-directory k8s-merge
	@$(MAKE) --no-print-directory k8s-serve

k8s-infra:
	$(K8S_APPLY) distill.stage=infra

# Secret values come from your environment, never from a file in the repository, and reach
# kubectl on stdin (not on its command line).
k8s-secrets: k8s-infra
	@test -n "$$TEACHER_API_KEY" || { echo "export TEACHER_API_KEY first" >&2; exit 1; }
	@test -f "$$GATEWAY_KEYS_FILE" || { echo "GATEWAY_KEYS_FILE: a file with one gateway key a line" >&2; exit 1; }
	@printf %s "$$TEACHER_API_KEY" | $(K8S) create secret generic distill-teacher \
	  --from-file=TEACHER_API_KEY=/dev/stdin --dry-run=client -o yaml | $(K8S) apply -f -
	@$(K8S) create secret generic distill-gateway-keys --from-file=keys="$$GATEWAY_KEYS_FILE" \
	  --dry-run=client -o yaml | $(K8S) apply -f -
	@if [ -n "$$HF_TOKEN" ]; then printf %s "$$HF_TOKEN" | $(K8S) create secret generic \
	  distill-hf --from-file=HF_TOKEN=/dev/stdin --dry-run=client -o yaml | $(K8S) apply -f -; fi

k8s-check-secrets:
	@$(K8S) get secret distill-teacher distill-gateway-keys >/dev/null || { \
	  echo "create the Secrets first: make k8s-secrets (README, Kubernetes)" >&2; exit 1; }

k8s-generate:
	$(call k8s_job,job/generate,generate,Complete)

k8s-train:
	$(call k8s_job,$(K8S_TRAIN),train,$(if $(findstring jobset,$(K8S_TRAIN)),Completed,Complete))

k8s-merge:
	$(call k8s_job,job/merge,merge,Complete)

k8s-serve:
	$(K8S_APPLY) distill.stage=serve
	$(K8S) rollout status deployment/vllm --timeout=$(K8S_SERVE_TIMEOUT)
	$(K8S) rollout status deployment/gateway --timeout=5m
	@echo "gateway: kubectl -n $(K8S_NS) port-forward service/gateway 8080:8080, or route your ingress to it"

k8s-status:
	$(K8S) get jobs,deployments,pods,pvc -l app.kubernetes.io/part-of=distill

# everything but the volumes (data, caches) and the infra stage
k8s-down:
	$(K8S) delete jobs,deployments,services,hpa,pdb -l 'distill.stage in (generate,train,merge,serve)'
	-$(K8S) delete jobsets.jobset.x-k8s.io,servicemonitors,podmonitors,prometheusrules \
	  -l 'distill.stage in (train,serve)'

k8s-render:
	$(KUBECTL) kustomize $(K8S_DIR)

k8s-lint: $(CHECKOV_STAMP)
	$(KUBECTL) kustomize $(K8S_DIR) > $(CHECKOV_VENV)/rendered.yaml
	$(CHECKOV_VENV)/bin/checkov --config-file tests/k8s/checkov.yaml --compact --quiet \
	  -f $(CHECKOV_VENV)/rendered.yaml

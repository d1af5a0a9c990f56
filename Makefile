# The two set-up commands of the README: `make up` and `make test`.
SHELL := /bin/bash
VENV := .venv
# llm-svc on vLLM has a venv of its own (why: scripts/bootstrap.sh); only the tests need it.
VLLM_VENV := .venv-vllm
PACKAGES := $(wildcard */pyproject.toml) pyproject.toml

.PHONY: up test install vllm openwebui milvus system-deps lint images lock

$(VENV)/.installed: $(PACKAGES) locks/stack.txt scripts/bootstrap.sh scripts/uv.sh
	scripts/bootstrap.sh

$(VLLM_VENV)/.installed: common/pyproject.toml llm-svc/pyproject.toml locks/vllm.txt scripts/bootstrap.sh scripts/uv.sh
	scripts/bootstrap.sh --vllm

# Open WebUI, the chat UI tests/test_openwebui.py drives: only the tests need it.
OPENWEBUI_VENV := .venv-openwebui
$(OPENWEBUI_VENV)/.installed: scripts/bootstrap.sh scripts/uv.sh
	scripts/bootstrap.sh --openwebui

# A real Milvus standalone server (2.3.5), which tests/milvus_server.py starts for the
# remote contract suite: only the tests need it.
MILVUS_VENV := .venv-milvus
$(MILVUS_VENV)/.installed: scripts/milvus-server.sh scripts/uv.sh
	scripts/milvus-server.sh

install: $(VENV)/.installed

vllm: $(VLLM_VENV)/.installed

openwebui: $(OPENWEBUI_VENV)/.installed

milvus: $(MILVUS_VENV)/.installed

system-deps:
	scripts/bootstrap.sh --system

## Run the whole stack on its embedded defaults, in the foreground (Ctrl-C stops it all).
## With a model: RAGLINE_LLM_ENGINE=vllm RAGLINE_LLM_VLLM_MODEL=PATH_OR_ID make up (builds
## .venv-vllm first; docs/running-with-a-model.md). UP_ARGS: more `ragline up` flags.
UP_DEPS := install
ifeq ($(RAGLINE_LLM_ENGINE),vllm)
UP_DEPS += vllm
endif
up: $(UP_DEPS)
	$(VENV)/bin/ragline up $(UP_ARGS)

## Run the test suite against real processes on loopback.
test: install vllm openwebui milvus system-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

## The four service images, ragline/{gateway,retriever,reranker,llm}:dev (TAG=... for another
## tag), with docker or podman; tests/test_images.py builds and runs them too.
images: system-deps
	scripts/images.sh

## Re-resolve locks/*.txt after changing a pyproject's dependencies.
lock:
	scripts/lock.sh

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

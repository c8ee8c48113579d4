# `make image`: the container image (Dockerfile), built with docker or podman.
# Included from the Makefile: `include mk/image.mk`.
#
#   make image                          escrow-stream:<version> and escrow-stream:latest
#   make image IMAGE_ENGINE=podman      choose the engine (default: docker when its daemon
#                                       answers, else podman; podman builds in docker format,
#                                       since the OCI format drops HEALTHCHECK)
#   make image IMAGE_BUILD_ARGS='--build-arg BASE_IMAGE=localhost/escrow-base:bookworm'
#   (IMAGE_ENGINE may carry the engine's own flags: IMAGE_ENGINE='podman --runtime runc')

IMAGE_NAME ?= escrow-stream
IMAGE_ENGINE ?=
IMAGE_BUILD_ARGS ?=

.PHONY: image

image:
	@set -euo pipefail; \
	engine="$(IMAGE_ENGINE)"; \
	if [ -z "$$engine" ]; then \
	  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker; \
	  elif command -v podman >/dev/null 2>&1; then engine=podman; \
	  else \
	    echo "make image: no container engine: install podman, or docker with a running" \
	         "daemon (docker: $$(command -v docker || echo 'not installed'))" >&2; \
	    exit 1; \
	  fi; \
	fi; \
	version=$$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'); \
	revision=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown); \
	case "$$engine" in *podman*) format="--format docker";; *) format=;; esac; \
	set -x; \
	$$engine build $$format \
	  --build-arg VERSION="$$version" \
	  --build-arg REVISION="$$revision" \
	  --build-arg CREATED="$$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
	  $(IMAGE_BUILD_ARGS) \
	  -t "$(IMAGE_NAME):$$version" -t "$(IMAGE_NAME):latest" .

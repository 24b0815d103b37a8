# Two entry points for a fresh Debian/Ubuntu machine: `make demo` and `make test`.
# Each creates .venv if missing, installs the system packages it needs (when root or sudo is
# available), installs the project with all extras, then runs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rded-fast-installed
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist
# torch/torchvision: the registry's standard builds (CUDA-enabled, run on CPU too); see README.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test system-deps install clean

demo: install
	$(VENV)/bin/rded-fast demo

test: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "system packages present"; \
	elif ! command -v apt-get >/dev/null; then echo "warning: no apt-get; install$$missing yourself"; \
	else SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  echo "installing system packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null \
	  || echo "warning: could not install$$missing (ffcv and the packaged Fashion-MNIST need them)"; fi

$(STAMP): setup.py | system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[ffcv,dali,timm,dev,plots]'
	touch $(STAMP)

install: system-deps $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info

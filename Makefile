# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Each creates .venv, installs torch's CPU build first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then the project.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint test-slow bench fashion-mnist haproxy wrk venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
fashion-mnist:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing at $(FMNIST) and apt is not usable here."; \
	  echo "Install it with: sudo apt-get install -y dataset-fashion-mnist"; \
	  echo "or point data.path= at a folder holding the four IDX .gz files."; \
	  exit 1; \
	fi

# Optional Debian tools, installed when apt is usable (as root), else a note and the fallback:
# $(call apt_optional,COMMAND,WHAT IT IS FOR,FALLBACK)
define apt_optional
	@if command -v $(1) >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(1) (Debian package; $(2))"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null) || \
	  echo "$(1) could not be installed: $(3)"; \
	else \
	  echo "no $(1): $(3) (apt-get install $(1) for $(2))"; \
	fi
endef

# HAProxy: `gdm-ray serve` puts Ray Serve's HAProxy ingress in front of its replicas
# when the binary is installed (ingress=auto), else Serve's Python proxy.
haproxy:
	$(call apt_optional,haproxy,Ray Serve's faster HTTP ingress,gdm-ray serve uses Ray Serve's Python proxy)

# wrk: bench/serve.py's load generator when installed (C: leaves the cores to Serve), else aiohttp.
wrk:
	$(call apt_optional,wrk,bench/serve.py's C load generator,bench/serve.py uses its aiohttp client)

demo: $(STAMP) fashion-mnist haproxy
	$(BIN)/gdm-ray demo

# ruff first: a lint or format error fails the test run (and CI) in seconds
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) fashion-mnist haproxy lint
	$(BIN)/python -m pytest

test-slow: $(STAMP) fashion-mnist haproxy
	$(BIN)/python -m pytest -m slow

bench: $(STAMP) fashion-mnist haproxy wrk
	$(BIN)/python bench/attack.py
	$(BIN)/python bench/defense.py
	$(BIN)/python bench/mesa_batching.py
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/quote.py

clean:
	rm -rf $(VENV) gdm-ray-runs .pytest_cache

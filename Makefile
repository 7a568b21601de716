# Two commands for a newcomer: `make demo` (the main job) and `make test`.
# Each creates .venv, installs torch's CPU build first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then the project.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-slow bench fashion-mnist haproxy wrk venv clean

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

# HAProxy is optional: `gdm-ray serve` puts Ray Serve's HAProxy ingress in front of
# its replicas when the binary is installed (ingress=auto), else Serve's Python proxy.
haproxy:
	@if command -v haproxy >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing haproxy (Debian package; Ray Serve's faster HTTP ingress)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null) || \
	  echo "haproxy could not be installed: gdm-ray serve uses Ray Serve's Python proxy"; \
	else \
	  echo "no haproxy: gdm-ray serve uses Ray Serve's Python proxy (apt-get install haproxy for the faster ingress)"; \
	fi

# wrk is optional: bench/serve.py's load generator when installed (C: leaves the cores to Serve), else aiohttp.
wrk:
	@if command -v wrk >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing wrk (Debian package; bench/serve.py's HTTP load generator)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null) || \
	  echo "wrk could not be installed: bench/serve.py uses its aiohttp client"; \
	else \
	  echo "no wrk: bench/serve.py uses its aiohttp client (apt-get install wrk for the C load generator)"; \
	fi

demo: $(STAMP) fashion-mnist haproxy
	$(BIN)/gdm-ray demo

test: $(STAMP) fashion-mnist haproxy
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

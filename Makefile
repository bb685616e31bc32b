# Two commands do all set-up on a fresh machine:
#   make run   - create .venv, install framewatch, run the built-in demo config
#   make test  - install the dev extras too, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to the builds this project is tested with; override on other machines,
# e.g. `make run TORCH="torch torchaudio"`.
TORCH  ?= torch==2.14.1 torchaudio==2.11.0
PYTEST_ARGS ?=

.PHONY: run test install dev samples ffmpeg-cli bench corruption-bench train gpu-check gpu-wheels lint clean audio-bench serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

run: $(VENV)/.installed
	$(BIN)/framewatch run

# The service: API, mosaic page at http://127.0.0.1:8080/, /metrics, webhook delivery (Ctrl-C or SIGTERM drains)
SERVE_CONFIG ?= configs/service.yaml
serve: $(VENV)/.installed
	$(BIN)/framewatch serve $(SERVE_CONFIG)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

samples:
	bash tests/fetch_samples.sh

# The benchmarks measure against the ffmpeg CLI (Debian's FFmpeg 5.1): installed when it is missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
ffmpeg-cli:
	@command -v ffmpeg >/dev/null 2>&1 || { echo "installing the ffmpeg CLI (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends ffmpeg; }

bench: $(VENV)/.installed ffmpeg-cli
	$(BIN)/python benchmarks/cpu_vs_ffmpeg.py

# The corruption CNN: train a candidate (framewatch-out/models/candidate.pt), and its benchmark against
# FFmpeg blockdetect and the core blockiness kernel (needs the ffmpeg CLI; builds the data set on first use)
train: $(VENV)/.installed
	$(BIN)/framewatch train

corruption-bench: $(VENV)/.installed ffmpeg-cli
	$(BIN)/python benchmarks/corruption_vs_blockdetect.py

# Audio scoring cost per stream-hour against FFmpeg ebur128+silencedetect+astats, and A/V offset accuracy.
audio-bench: $(VENV)/.installed ffmpeg-cli
	$(BIN)/python benchmarks/audio_bench.py

# On a GPU machine: cuda tests + GPU benchmark (WHEELS: folder of wheels or site-*.tar.xz to install first)
gpu-check:
	bash benchmarks/gpu_check.sh $(WHEELS)

# Here, before a GPU check on a machine without a package registry: the wheels gpu-check installs, packed small
gpu-wheels:
	bash benchmarks/gpu_wheels.sh $(WHEELS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) framewatch-out .pytest_cache *.egg-info

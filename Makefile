# Two commands do everything on a fresh machine:
#   make demo   set up (venv, packages, offline data and weights) and run the offline default job
#   make test   set up and run the test suite
#   make synthetic   train the offline diffusion generator on the public split and render its images (DP-Mix_Diff)
# Every pip step goes through constraints.txt (torch and torchvision pinned together).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(VENV)/bin/pip
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_CONFIG ?= fmnist_effnet_lite0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint format setup data synthetic chromium clean help
help:
	@echo "make demo   - set up and run the offline default (EfficientNet-Lite0 on Fashion-MNIST, eps=8)"
	@echo "make test   - set up and run the tests"
	@echo "make test-fast - the unit tier only (no slow end-to-end or gpu tests), for iteration"
	@echo "make format - apply the formatter and the linter's safe fixes (ruff, configured in pyproject.toml)"
	@echo "make synthetic - train the offline generator on the public split, render and check its images"
	@echo "make chromium - install headless Chromium for the MLflow UI test (make test does this where apt-get can)"

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[offline,test]'
	touch $@

setup: $(VENV)/.installed

$(FMNIST_DIR)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# The train split is cut into a public part (10k: 8k for the diffusion generator, 2k of validation data for tuning)
# and the private rest (50k, what fine-tuning uses), plus a data-independent private subset of 2k (the small-data
# regime of docs/results.md); every folder records the split. Keyed on the subset folder: older folders are redone.
data/fashion_mnist_2k/metadata.json: | $(FMNIST_DIR)/train-images-idx3-ubyte.gz $(VENV)/.installed
	$(PY) launch/prepare_data.py fashion_mnist --source $(FMNIST_DIR) --out data/fashion_mnist \
		--public-out data/fashion_mnist_public --public-count 10000 --validation-count 2000 \
		--subset-out data/fashion_mnist_2k --subset-count 2000 --overwrite

data: data/fashion_mnist_2k/metadata.json

# Headless Chromium for the MLflow UI test (tests/test_registered_model.py renders the UI's pages in it; without a
# browser that test is skipped, saying so). Debian's package, ~40 s and ~420 MiB with its recommends on the development
# machine; installed only where apt-get runs as root or through password-less sudo, else a note and the skip.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "no chromium (and no root apt-get): the MLflow UI test will be skipped"; fi

models/fmnist_ddpm/dpmix_generator.json: data/fashion_mnist_2k/metadata.json
	HF_HUB_OFFLINE=1 $(PY) launch/train_diffusion.py --config fmnist_ddpm $(if $(wildcard models/fmnist_ddpm/checkpoint.pt),--resume)

data/fmnist_synthetic/metadata.json: models/fmnist_ddpm/dpmix_generator.json
	HF_HUB_OFFLINE=1 $(PY) launch/generate.py --config fmnist_ddpm
	HF_HUB_OFFLINE=1 $(PY) launch/generate.py --config fmnist_ddpm --check

synthetic: data/fmnist_synthetic/metadata.json

demo: setup data
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_1proc.yaml \
		launch/finetune.py --config $(DEMO_CONFIG)

# the formatter and linter first (seconds), then every test
lint: setup
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

format: setup
	$(VENV)/bin/ruff format --quiet .
	$(VENV)/bin/ruff check --quiet --fix .

test: setup lint chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

# for iteration: the unit tier only (no multi-process / end-to-end `slow` tests, no `gpu`)
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not gpu" --durations=10

clean:
	rm -rf $(VENV) data runs .cache models

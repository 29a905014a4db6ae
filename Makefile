# saev-store: `make demo` (record -> train nine SAEs -> exemplars and HTML report on the embedded
# default) and `make test`. Both set everything up from a fresh clone (Python 3.10+, pip, apt as root
# or with sudo for the Fashion-MNIST files and the headless browser the report test drives).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision: the pair pinned here installs from PyPI anywhere (CPU or CUDA build by platform).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromedriver
DEMO ?= demo
DEMO_IMAGES ?= 6000

.PHONY: setup data browser demo test test-quick bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

browser: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q chromium chromium-driver

demo: setup data
	$(BIN)/saev-store record --out $(DEMO)/fmnist.zarr --limit $(DEMO_IMAGES) --image-size 112
	$(BIN)/saev-store info $(DEMO)/fmnist.zarr
	@echo "store: $(DEMO)/fmnist.zarr"

test: setup data browser
	$(PY) -m pytest -q

test-quick: setup data
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO) .pytest_cache

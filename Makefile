# saev-store: `make demo` (record -> train nine SAEs -> exemplars and HTML report on the embedded
# default) and `make test`. Both set everything up from a fresh clone (Python 3.11+, pip, apt as root
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

# The demo: 6000 Fashion-MNIST images through EfficientNet-Lite0 at 112 px; `_blocks.10` (layer 10)
# gives 7x7 patches of d=112, `_blocks.15` (the last block) 4x4 of d=320. `--masks pixels` labels each
# patch from the item's own pixels in the same pass (0 background, class k as k+1). A small store
# needs a smaller batch and more steps than saev-train's defaults, which are set for ImageNet-sized
# stores. Then a linear classifier on the later hook and a segmentation head on the SAEs' hook.
demo: setup data
	$(BIN)/saev-store record --out $(DEMO)/fmnist.zarr --limit $(DEMO_IMAGES) --image-size 112 --layer 10 --layer 15 --masks pixels
	$(BIN)/saev-store info $(DEMO)/fmnist.zarr
	rm -rf $(DEMO)/run
	$(BIN)/saev-train $(DEMO)/fmnist.zarr --hook _blocks.10 --out $(DEMO)/run \
		--batch-size 256 --lr 4e-3 --n-patches 262144 --warmup-steps 20 --l1-warmup-steps 100
	$(BIN)/saev-tools topk $(DEMO)/run --overwrite
	$(BIN)/saev-tools report $(DEMO)/run/topk --max-pages 24
	$(BIN)/saev-tools head $(DEMO)/fmnist.zarr --hook _blocks.15 --task classify --out $(DEMO)/heads/classify --overwrite
	$(BIN)/saev-tools head $(DEMO)/fmnist.zarr --hook _blocks.10 --task segment --out $(DEMO)/heads/segment --overwrite
	@echo "store:  $(DEMO)/fmnist.zarr"
	@echo "SAEs:   $(DEMO)/run (L0/FVU table: $(DEMO)/run/table.md)"
	@echo "report: $(DEMO)/run/topk/report/index.html"
	@echo "heads:  $(DEMO)/heads/classify, $(DEMO)/heads/segment (head.json, confusion.png, per_class.md)"

test: setup data browser
	$(PY) -m pytest -q -rs

test-quick: setup data
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO) .pytest_cache

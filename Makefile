# ssl_lightning: `make demo` (set up + a short SimCLR pretraining with live probe / kNN metrics)
# and `make test` (set up + the test suite). Both create .venv and install the package on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	# USB's semilearn as a test reference only: without its dependencies (timm < 0.9, transformers, ...);
	# tests/test_semi_pieces.py loads two of its files by path, which need only torch and numpy
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps semilearn==0.3.2
	$(PY) -c "import torch, torchvision, torchvision.ops, lightning, lightly; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

# Fashion-MNIST from Debian (the four idx .gz files land in /usr/share/datasets/fashion-mnist)
data:
	@test -f $(FMNIST) || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: setup data
	$(VENV)/bin/ssl-lightning fit --config experiments/fashion_mnist/demo.yaml

test: setup data
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache

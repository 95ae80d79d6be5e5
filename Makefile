# Each target does its own set-up: a fresh clone needs only Python >= 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayledger-installed

.PHONY: demo test bench lint clean device

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rayledger needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayledger demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/rayledger bench core

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy ledger kernels actors cluster

# .device/ for the GPU machine (the `device` tool, with carry [".device"]): every runtime
# dependency its image lacks (device-pack.sh packs Ray its own way and drops what the image
# holds), then `bash .device/setup.sh && bash tests/gpu_check.sh all` there. Not
# grafana-client: nothing there imports it, and its urllib3-future wheel would overwrite the
# image's urllib3.
DEVICE_SKIP := ray grafana-client
device:
	EXTRA_WHEELS="$$($(PYTHON) -c 'import re, sys, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(" ".join(n for n in (re.split(r"[^A-Za-z0-9_.-]", d)[0] for d in deps) if n not in sys.argv[1:]))' $(DEVICE_SKIP))" \
		../shared/tools/device-pack.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Rules call `python -m egm`; the venv's python must come first on their PATH.
RUN     := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
PYTEST_ARGS ?=

.PHONY: setup demo test clean-demo containers

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: the CPU build (no multi-GB CUDA download).
	$(PYTHON) -m pip install --quiet -e '.[test,cluster,reports]'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(RUN) snakemake --cores all --configfile config/demo.yaml
	$(RUN) snakemake --cores all --configfile config/demo.yaml --report results/report.html

test: $(STAMP)
	$(RUN) $(PYTHON) -m pytest $(PYTEST_ARGS)

# Apptainer images named <definition>-<hash>.sif under containers/images/ (containers/README.md).
# The GPU images need a machine with registry access: `make containers IMAGES=cpu` builds the CPU one.
IMAGES ?= cpu gpu-vllm gpu-sglang
containers: $(STAMP)
	PYTHON="$(CURDIR)/$(PYTHON)" containers/build.sh $(IMAGES)

clean-demo:
	rm -rf results resources logs .snakemake

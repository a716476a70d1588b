# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Rules call `python -m egm`; the venv's python must come first on their PATH.
RUN     := PATH="$(CURDIR)/$(VENV)/bin:$$PATH"
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean-demo containers gpu-smoke-mirror plan paper-cost

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: the CPU build (no multi-GB CUDA download).
	$(PYTHON) -m pip install --quiet -e '.[test,cluster,reports]'
	touch $@

setup: $(STAMP)

# Ends with the demo's table and its verdict against config/demo.yaml's `report.expected`.
demo: $(STAMP)
	$(RUN) snakemake --cores all --configfile config/demo.yaml
	$(RUN) snakemake --cores all --configfile config/demo.yaml --report results/report.html
	@echo
	@awk '/^Notes:/ {nextfile} {print}' results/tables/refcoco.md results/tables/refcoco_vs_expected.md

test: $(STAMP)
	$(RUN) $(PYTHON) -m pytest $(PYTEST_ARGS)

# The price of a run before it runs (docs/cost.md): every job Snakemake plans for the config and
# targets, its GPU-hours, wall time and memory on PLAN_GPUS x PLAN_GPU, each with its source.
# After a run, `make plan PLAN_ARGS=--check` puts each job's measurement beside its estimate.
PLAN_CONFIG ?= config/config.yaml
PLAN_GPU    ?= H100
PLAN_GPUS   ?= 8
PLAN_ARGS   ?=
TARGETS     ?=
plan: $(STAMP)
	$(RUN) python -m egm plan --configfile $(PLAN_CONFIG) --gpu "$(PLAN_GPU)" --gpus $(PLAN_GPUS) $(PLAN_ARGS) $(TARGETS)

# docs/cost.md and its record: the paper config priced on 1 and 8 H100s, 8 H200s, 8 A100s.
paper-cost: $(STAMP)
	$(RUN) python -m benchmarks.paper_cost --out benchmarks/results/paper-cost.json --doc docs/cost.md

# The rule files' formatting (snakefmt, settings in pyproject.toml), then `snakemake --lint` on
# every shipped config; any lint fails (CI runs this before the tests).
LINT_CONFIGS := config/config.yaml config/demo.yaml config/gpu-smoke.yaml config/cluster-smoke.yaml
lint: $(STAMP)
	$(RUN) snakefmt --check Snakefile workflow/
	@for c in $(LINT_CONFIGS); do \
	  out=$$($(RUN) snakemake --lint --configfile $$c 2>&1); \
	  if echo "$$out" | grep -q '^Lints for'; then echo "$$out"; echo "lint: $$c has lints"; exit 1; fi; \
	  echo "lint: $$c clean"; \
	done

# Apptainer images named <definition>-<hash>.sif under containers/images/ (containers/README.md).
# Each build writes containers/records/<image>.json (containers/README.md). `make containers
# IMAGES=cpu` builds the CPU image (minutes); a GPU image takes much longer (README's table).
IMAGES ?= cpu gpu-vllm gpu-sglang
containers: $(STAMP)
	PYTHON="$(abspath $(PYTHON))" containers/build.sh $(IMAGES)

# The offline mirror of config/gpu-smoke.yaml (docs/inference.md): the demo data set with 64 eval
# records per split, the demo's trained SFT model (`make demo` first) and the Qwen3-VL-8B
# architecture without weights. Any machine; the GPU machine only reads it.
SMOKE := resources/gpu_smoke_mirror
gpu-smoke-mirror: $(STAMP)
	test -f results/checkpoints/tiny/sft.json || $(MAKE) demo
	rm -rf $(SMOKE)
	$(RUN) python -m egm make-demo --mirror $(SMOKE) --dataset-repo egm-demo/EGM_Datasets \
	  --model-repo egm-demo/tiny-qwen3-vl --train-images 64 --eval-per-split 64 --summary $(SMOKE)/demo.json
	# The random tiny model make-demo writes is not one of the smoke models.
	rm -rf $(SMOKE)/egm-demo/tiny-qwen3-vl
	cp -r results/checkpoints/tiny/sft $(SMOKE)/egm-demo/tiny-qwen3-vl-sft
	$(RUN) python -m egm write-architecture --arch qwen3-vl-8b --out $(SMOKE)/egm-gpu-smoke/qwen3-vl-8b-architecture

clean-demo:
	rm -rf results resources logs .snakemake

# EGM reproduction pipeline. The paper run:   snakemake --cores all
# The embedded demo:                          snakemake --cores all --configfile config/demo.yaml
from snakemake.utils import min_version, validate

min_version("9.0")

# A --configfile replaces the paper config rather than merging into it (models would mix).
if not config:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/latency.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/scaling.smk"


rule all:
    input:
        rules.table_refcoco.output,
        rules.table_refcoco_thresholds.output,
        rules.figure_tradeoff.output,
        rules.figure_tokens.output,
        rules.table_latency.output,
        rules.figure_training.output if TRAINING_STAGES else [],
        rules.table_scaling.output,
        rules.figure_scaling.output,
        rules.table_cost.output,
        expand("resources/rl/{part}.parquet", part=RL_PARTS),

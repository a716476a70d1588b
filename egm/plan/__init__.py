"""What a reproduction costs before it runs, and what it cost after (`python -m egm plan`).

`jobs` lists the jobs Snakemake itself plans for a config and targets; `gpus` holds the cards'
published figures and the latency split shared with benchmarks/projection.py; `cost` prices one
job from the committed measurement records in benchmarks/results/; `plan` puts the priced jobs
together (sums, a schedule on N GPUs, the estimate beside a finished run's measurement).
"""

"""The inference backends behind egm.infer.base's Engine interface: `hf` (transformers), `vllm`,
`sglang` and `server` (an OpenAI-compatible server, started here or external, through `client`),
plus what runs them on several GPUs (`gpus`, `replicas`, `ray_slurm`). Loaded by name through
egm.infer.engine.load_engine; the jobs (predict, latency, budget) never import them directly."""

"""The fast decode for the `hf` backend on one GPU (`engine_options.decode: graph`), a subsystem of
its own: `decoder` (GraphDecoder: static KV cache, CUDA-graph decode steps), `prefill` (the
vision tower and prompt into that cache), `kernels` (Triton kernels for batch 1) and `engine`
(FastHFEngine, the Engine that uses them). Only egm.infer.engine.load_engine and the benchmarks
import it."""

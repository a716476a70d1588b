"""The fast hf decode (static cache, graph-replayed steps; eager on CPU) and data-parallel replicas,
both against the plain hf backend on the tiny model."""

import pytest
from PIL import Image, ImageDraw

from egm.grounding import PROMPTS
from egm.infer.backends.hf import HFEngine
from egm.infer.backends.replicas import ReplicatedEngine
from egm.infer.base import Request
from egm.infer.engine import load_engine
from egm.infer.fast.engine import FastHFEngine
from egm.options import SamplingOptions

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def mixed_requests(tmp_path_factory):
    """Images of different sizes (so different visual token counts) and prompt lengths."""
    root = tmp_path_factory.mktemp("fast-images")
    out = []
    for i, (size, colour, sent) in enumerate([((96, 96), "red", "the red circle"),
                                               ((160, 96), "blue", "the blue square left of the green triangle"),
                                               ((96, 128), "green", "x"),
                                               ((96, 96), "yellow", "the small yellow star")]):
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).ellipse((10 + 8 * i, 20, 60 + 8 * i, 70), fill=colour)
        path = root / f"{i}.png"
        img.save(path)
        out.append(Request(str(i), str(path), PROMPTS["qwen3"].format(sent=sent)))
    return out


@pytest.fixture(scope="module")
def reference(tiny_dir, mixed_requests):
    engine = HFEngine(str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS), batch_size=4)
    try:
        return engine.generate(mixed_requests)
    finally:
        engine.close()


def test_graph_decode_matches_generate(tiny_dir, mixed_requests, reference):
    engine = load_engine("hf", str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS),
                         {"batch_size": 3, "decode": "graph", "length_bucket": 16, "data_parallel_size": 1})
    try:
        assert isinstance(engine, FastHFEngine)
        out = engine.generate(mixed_requests)
        # The first decode step's logits against the model's own generate().
        from egm.models.inputs import build_inputs

        img = Image.open(mixed_requests[0].image_path).convert("RGB")
        inputs = build_inputs([img], [mixed_requests[0].prompt], engine.tokenizer, engine.image_processor)
        check = engine.decoder.check_step(inputs)
        # The prompt pass on its own (the latency benchmark times it so) records no autograd
        # graph: at batch 64 on the 8B one that did filled the H200's memory.
        first, _ = engine.decoder.prefill(inputs)
        assert first.is_inference()
    finally:
        engine.close()
    # Sorted by image size into batches of 3 and back: same texts, same counts, request order.
    assert [c.text for c in out] == [c.text for c in reference]
    assert [c.completion_tokens for c in out] == [c.completion_tokens for c in reference]
    assert check["rel_error"] < 1e-5 and check["argmax_agreement"] == 1.0


def test_decode_step_warmed_up_for_the_batch_size_while_loading(tiny_dir, mixed_requests, reference):
    """Compilation and graph capture belong to loading (as in vLLM), not to the first answer: on
    two H200s the first batch's warm-up made one replica per GPU no faster than one GPU."""
    engine = FastHFEngine(str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS), batch_size=3, length_bucket=16)
    try:
        assert (3, engine.decoder.ALIGN) in engine.decoder._states
        out = engine.generate(mixed_requests)
    finally:
        engine.close()
    assert [c.text for c in out] == [c.text for c in reference]


def test_graph_decode_is_greedy_only(tiny_dir):
    with pytest.raises(ValueError, match="greedy"):
        FastHFEngine(str(tiny_dir), SamplingOptions(temperature=0.7))


def test_replicas_split_and_reassemble(tiny_dir, mixed_requests, reference):
    # Two CPU replicas (no GPU to give them); each loads its own engine in its own process.
    engine = ReplicatedEngine(load_engine, "hf", str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS),
                              {"batch_size": 2}, [[], []])
    try:
        assert engine.chunk_size == 4 and engine.data_parallel_size == 2
        out = engine.generate(mixed_requests)
        one = engine.generate(mixed_requests[:1])  # fewer requests than replicas
    finally:
        engine.close()
    assert [c.text for c in out] == [c.text for c in reference]
    assert one[0].text == reference[0].text


@pytest.mark.parametrize("sizes", [[(96, 96)], [(96, 96), (96, 96)], [(96, 96), (160, 96)]],
                         ids=["one image", "images of one size", "images of two sizes"])
def test_prefill_matches_the_models_forward(tiny_dir, sizes):
    """The graph-ready prompt pass (host plan, then fixed-shape device work) against the model's own
    forward: first token, rope deltas and every layer's keys and values at the real positions."""
    import inspect

    import torch
    from transformers import DynamicCache

    from egm.infer.fast.engine import pad_left
    from egm.models.inputs import build_inputs

    engine = FastHFEngine(str(tiny_dir), SamplingOptions(max_tokens=4), batch_size=len(sizes), length_bucket=16)
    try:
        images = []
        for i, size in enumerate(sizes):
            img = Image.new("RGB", size, "white")
            ImageDraw.Draw(img).ellipse((10 + 9 * i, 20, 60, 70), fill="red")
            images.append(img)
        prompts = [PROMPTS["qwen3"].format(sent="the red circle" + " on the left" * i) for i in range(len(sizes))]
        inputs = build_inputs(images, prompts, engine.tokenizer, engine.image_processor)
        inputs = pad_left(inputs, inputs["input_ids"].shape[1] + 3, engine._pad_id)  # padding in every row
        decoder = engine.decoder
        length = inputs["input_ids"].shape[1]
        state = decoder.cache_state(len(sizes), length + 4)
        first, deltas = decoder.prefill(inputs, state)
        cache = DynamicCache(config=decoder.model.config)
        names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        with torch.inference_mode():
            cache_name = "cache" if "cache" in inspect.signature(decoder.model.model.forward).parameters else "past_key_values"
            out = decoder.model.model(**{k: inputs[k] for k in names}, use_cache=True, **{cache_name: cache})
            reference = torch.nn.functional.linear(out.last_hidden_state[:, -1], decoder.lm_head_w).argmax(-1)
        real = inputs["attention_mask"].bool()
        worst = 0.0
        for i, layer in enumerate(cache.layers):
            for ours, theirs in ((state.kv[i][0, :, :, :length], layer.keys), (state.kv[i][1, :, :, :length], layer.values)):
                diff = (ours - theirs).abs().amax(dim=(1, 3))[real].max() / theirs.abs().max()
                worst = max(worst, float(diff))
    finally:
        engine.close()
    assert first.tolist() == reference.tolist()
    assert deltas.tolist() == decoder.model.model.rope_deltas.view(-1).tolist()
    assert worst < 1e-5


def test_prefill_device_work_never_reads_the_gpu_back(tiny_dir):
    """What a CUDA graph captures must not sync with the host: the device part of the prompt pass
    runs on meta tensors (shapes without data), where any `.item()`, `.tolist()`, `nonzero`,
    boolean-mask index or data-dependent branch raises."""
    import dataclasses

    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from egm.infer.fast.decoder import GraphDecoder
    from egm.infer.fast.prefill import VisionTables
    from egm.models.inputs import build_inputs

    engine = FastHFEngine(str(tiny_dir), SamplingOptions(max_tokens=4), batch_size=2, length_bucket=16)
    try:
        images = [Image.new("RGB", (96, 96), "white"), Image.new("RGB", (160, 96), "white")]
        inputs = build_inputs(images, [PROMPTS["qwen3"].format(sent="x")] * 2, engine.tokenizer, engine.image_processor)
        plan = engine.decoder.prefiller.plan(inputs)  # the host part, on real data
        config = engine.model.config
    finally:
        engine.close()
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    decoder = GraphDecoder(model, use_graphs=False)
    meta = dataclasses.replace(plan, tables=VisionTables(*(t.to("meta") for t in dataclasses.astuple(plan.tables))))
    state = decoder.cache_state(2, inputs["input_ids"].shape[1] + 4)
    with torch.inference_mode():
        first = decoder.run_prefill(meta, inputs["input_ids"].to("meta"), inputs["attention_mask"].to("meta"),
                                    inputs["pixel_values"].to("meta"), plan.position_ids.to("meta"),
                                    plan.image_index.to("meta"), kv=state.kv)
    assert first.shape == (2,) and first.device.type == "meta"


def test_stop_ids_stay_where_a_captured_step_reads_them(tiny_dir):
    """A captured decode step reads the stop ids at their address at capture time. Made anew per
    call, the old tensor was freed while graphs still read it; on the H200 later allocations
    reused the memory and whole batches stopped after 33 or 49 tokens. Same stop set: same
    tensor; a new set: new tensor, and the graphs that read the old one are dropped."""
    from egm.models.inputs import build_inputs

    engine = FastHFEngine(str(tiny_dir), SamplingOptions(max_tokens=4), batch_size=1, length_bucket=16)
    try:
        decoder = engine.decoder
        inputs = build_inputs([Image.new("RGB", (96, 96), "white")], [PROMPTS["qwen3"].format(sent="x")],
                              engine.tokenizer, engine.image_processor)
        decoder.generate_ids(inputs, 3, [5, 7])
        stops = decoder._eos
        decoder.generate_ids(inputs, 3, [7, 5, 5])
        assert decoder._eos is stops and len(decoder._states) == 1
        decoder.generate_ids(inputs, 3, [5])
        assert decoder._eos is not stops and decoder._eos.tolist() == [5]
    finally:
        engine.close()



def test_decode_ends_when_every_row_has_stopped(tiny_dir):
    """On the CPU the host reads the stop flags after every step: decoding ends at the step where
    the last row met a stop id, with the tokens it would have made without stop ids."""
    import torch

    from egm.models.inputs import build_inputs

    engine = FastHFEngine(str(tiny_dir), SamplingOptions(max_tokens=4), batch_size=2, length_bucket=16)
    try:
        decoder = engine.decoder
        images = [Image.new("RGB", (96, 96), "white"), Image.new("RGB", (96, 96), "black")]
        inputs = build_inputs(images, [PROMPTS["qwen3"].format(sent=s) for s in ("x", "the dark one")],
                              engine.tokenizer, engine.image_processor)
        free = decoder.generate_ids(inputs, 8)
        assert decoder.steps_run == 8
        stops = [int(free[0, 3]), int(free[1, 5])]
        hits = torch.isin(free, torch.tensor(stops))
        last = max(int(row.nonzero()[0]) for row in hits)  # the step at which every row has stopped
        stopped = decoder.generate_ids(inputs, 8, stops)
    finally:
        engine.close()
    assert decoder.steps_run == max(last + 1, 2)  # a first step runs even after an eos from the prompt pass
    assert torch.equal(stopped, free[:, :decoder.steps_run])


class _StandInEvent:
    """A CUDA event's stand-in (no GPU here): remembers the step at which it was last recorded."""

    step = 0

    def record(self):
        self.recorded_at = _StandInEvent.step

    def synchronize(self):
        pass


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_stop_flags_are_read_lookahead_steps_behind(lookahead):
    """The CUDA side of the stop check, with a stand-in for the events (copies are synchronous on the
    CPU): each step's flags go to a slot of their own, the host reads those of the step launched
    `lookahead` - 1 launches back, never a slot a later step overwrote, and decoding ends
    `lookahead` - 1 steps after the step at which every row had stopped."""
    from collections import deque
    from types import SimpleNamespace

    import torch

    from egm.infer.fast.decoder import GraphDecoder

    decoder = object.__new__(GraphDecoder)
    decoder.lookahead = lookahead
    # A CUDA state's slots, as _State makes them there (the flags pinned, which needs a GPU).
    state = SimpleNamespace(batch=2, done=torch.zeros(2, dtype=torch.bool),
                            flags=torch.zeros(lookahead, 2, dtype=torch.bool),
                            events=[_StandInEvent() for _ in range(lookahead)])
    pending, read, ended = deque(), [], None
    for step in range(2, 30):
        _StandInEvent.step = step
        state.done[0] |= step >= 7
        state.done[1] |= step >= 11  # every row has stopped as of step 11
        slots = list(pending)
        if decoder._stopped(state, step, pending):
            ended = step
            break
        if len(slots) + 1 == lookahead:  # a slot was read: the oldest step's, recorded then
            read.append(state.events[slots[0] if slots else step % lookahead].recorded_at)
    assert ended == 11 + lookahead - 1
    assert read == list(range(2, ended - lookahead + 1))


KERNEL_RUN = """
import json, sys
from egm.infer.base import Request
from egm.infer.fast import kernels
from egm.infer.fast.engine import FastHFEngine
from egm.options import SamplingOptions

calls = {"gemv": 0, "attention": 0}
gemv, attention = kernels.gemv, kernels.attention

def counted(name, fn):
    def run(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return run

kernels.gemv, kernels.attention = counted("gemv", gemv), counted("attention", attention)
model_dir, max_tokens, requests = json.loads(sys.argv[1])
engine = FastHFEngine(model_dir, SamplingOptions(max_tokens=max_tokens), batch_size=1, length_bucket=16,
                      use_kernels=True)
calls.update(gemv=0, attention=0)  # the warm-up's step
out = engine.generate([Request(*r) for r in requests])
print(json.dumps({"texts": [c.text for c in out], "tokens": [c.completion_tokens for c in out],
                  "layers": len(engine.decoder.layers), "calls": calls}))
"""


def test_batch_one_decode_through_the_triton_kernels(tiny_dir, mixed_requests, reference):
    """Batch-1 steps through egm.infer.fast.kernels (matrix-vector products and attention), run here by
    Triton's interpreter in a process of its own (it must be chosen before Triton is imported):
    the same answers as generate, and the kernels really ran, every projection and every layer's
    attention of every step."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    requests = mixed_requests[:2]  # the interpreter is slow: two images of two sizes
    args = json.dumps([str(tiny_dir), MAX_TOKENS, [[r.id, r.image_path, r.prompt] for r in requests]])
    run = subprocess.run([sys.executable, "-c", KERNEL_RUN, args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["texts"] == [c.text for c in reference[:2]]
    assert out["tokens"] == [c.completion_tokens for c in reference[:2]]
    # Each request's decode steps (its first token comes from the prompt pass); a batch runs on
    # until its last row stops, so at least this many.
    steps = sum(t - 1 for t in out["tokens"])
    layers = out["layers"]
    assert out["calls"]["attention"] % layers == 0 and out["calls"]["attention"] >= layers * steps
    assert out["calls"]["gemv"] == (4 * layers + 1) * out["calls"]["attention"] // layers


def test_images_preprocessed_on_the_gpu_only_by_the_torchvision_processor(tiny_dir):
    """`preprocess_device: auto` keeps the CPU for the PIL processor and for a CPU model; a GPU asked
    for by name with the PIL processor is an error, not a silent CPU run."""
    from egm.infer.fast.engine import image_device
    from egm.models.inputs import load_processor_parts

    _, pil = load_processor_parts(tiny_dir, backend="pil")
    assert image_device(pil, "cuda") is None
    assert image_device(pil, "cpu", "cpu") is None
    with pytest.raises(ValueError, match="torchvision"):
        image_device(pil, "cuda", "cuda")


def test_one_batch_of_requests_answered_in_order_without_sorting(tiny_dir, mixed_requests, reference):
    """Requests that fit one batch are not sorted by image size (no image opened twice); the
    answers still come back in the order asked."""
    engine = FastHFEngine(str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS), batch_size=4, length_bucket=16)
    opened = []
    engine._visual_tokens = lambda path: opened.append(path) or 0
    try:
        out = engine.generate(mixed_requests)
        assert opened == []
        engine.batch_size = 2  # two batches: sorted by size again
        again = engine.generate(mixed_requests)
    finally:
        engine.close()
    assert len(opened) == len(mixed_requests)
    assert [c.text for c in out] == [c.text for c in again] == [c.text for c in reference]

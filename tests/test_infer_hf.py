import inspect

import pytest
from PIL import Image, ImageDraw

from egm.grounding import PROMPTS
from egm.infer.backends.hf import HFEngine
from egm.infer.base import Request
from egm.infer.engine import load_engine
from egm.options import SamplingOptions

MAX_TOKENS = 12


@pytest.fixture(scope="session")
def requests_(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    sents = ["the red circle", "the blue square left of the green triangle", "the small yellow star"]
    out = []
    for i, (colour, sent) in enumerate(zip(("red", "blue", "yellow"), sents)):
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).ellipse((10 + 10 * i, 20, 60 + 10 * i, 70), fill=colour)
        path = root / f"img{i}.png"
        img.save(path)
        # Different prompt lengths, so batching has to pad.
        out.append(Request(id=str(i), image_path=str(path), prompt=PROMPTS["qwen3"].format(sent=sent)))
    return out


@pytest.fixture(scope="session")
def greedy(tiny_dir):
    engine = HFEngine(str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS), batch_size=3)
    yield engine
    engine.close()


def test_generate_shape_and_determinism(greedy, requests_):
    first = greedy.generate(requests_)
    assert len(first) == 3
    for c in first:
        assert 1 <= c.completion_tokens <= MAX_TOKENS
        assert c.latency_s > 0
        assert isinstance(c.text, str)
        assert "<|endoftext|>" not in c.text and "<|im_end|>" not in c.text
    # One batch: every request reports the same batch wall time.
    assert len({c.latency_s for c in first}) == 1
    second = greedy.generate(requests_)
    assert [c.text for c in first] == [c.text for c in second]
    assert [c.completion_tokens for c in first] == [c.completion_tokens for c in second]


def test_batching_does_not_change_greedy_text(tiny_dir, greedy, requests_):
    batched = greedy.generate(requests_)
    single = HFEngine(str(tiny_dir), SamplingOptions(max_tokens=MAX_TOKENS), batch_size=1)
    try:
        one_by_one = single.generate(requests_)
    finally:
        single.close()
    assert [c.text for c in one_by_one] == [c.text for c in batched]
    assert [c.completion_tokens for c in one_by_one] == [c.completion_tokens for c in batched]
    # Each of the three batches is timed on its own.
    assert len({c.latency_s for c in one_by_one}) == 3


def test_order_is_preserved(greedy, requests_):
    forward = greedy.generate(requests_)
    backward = greedy.generate(list(reversed(requests_)))
    assert [c.text for c in reversed(backward)] == [c.text for c in forward]


def test_completion_counts_stop_at_eos(greedy):
    import torch

    eos = greedy._eos_ids[0]
    pad = greedy._pad_id
    a, b = 70, 71
    rows = torch.tensor([[a, b, eos, pad, pad], [a, a, a, a, a]])
    done, cut = greedy._completions(rows, latency=0.5)
    assert done.completion_tokens == 3
    assert done.text == greedy.tokenizer.decode([a, b])
    assert cut.completion_tokens == 5


def test_sampling_is_seeded(tiny_dir, requests_):
    options = SamplingOptions(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, top_k=20,
                              presence_penalty=1.5, extra={"seed": 7})
    engine = HFEngine(str(tiny_dir), options, batch_size=3)
    try:
        first = engine.generate(requests_)
        second = engine.generate(requests_)
    finally:
        engine.close()
    assert [c.text for c in first] == [c.text for c in second]
    assert all(1 <= c.completion_tokens <= MAX_TOKENS for c in first)


def test_trust_remote_code_off_by_default(tiny_dir, monkeypatch, requests_):
    import transformers

    assert inspect.signature(HFEngine).parameters["trust_remote_code"].default is False
    calls = []
    original = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    engine = load_engine("hf", str(tiny_dir), SamplingOptions(max_tokens=2), {"batch_size": 2})
    try:
        assert engine.name == "hf"
        assert len(engine.generate(requests_[:1])) == 1
    finally:
        engine.close()
    assert calls and calls[0]["trust_remote_code"] is False
    assert engine.model is None

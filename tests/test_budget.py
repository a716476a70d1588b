"""Budget forcing (egm.infer.budget): the two-phase protocol on a scripted engine and on the real
tiny model (random weights, so the cases are ones whose closing can be controlled: a budget too
small to close, N = 0, unlimited), the sweep of one model, and the request construction of the
other backends (vLLM, SGLang, the OpenAI-compatible client) without their engines."""

import json
from dataclasses import replace

import pytest
from PIL import Image, ImageDraw

from egm.grounding import PROMPTS, parse_box
from egm.infer import budget as bf
from egm.infer.backends.hf import HFEngine
from egm.infer.base import Completion, EngineBase, Request, batches_by_settings
from egm.infer.budget import END_THINK, FORCED_CLOSE, generate_with_budget, parse_budget, sweep_model
from egm.metrics import evaluate_answer
from egm.options import SamplingOptions

ANSWER = 10  # answer tokens after the reasoning closes


# --------------------------------------------------------------------------- a scripted engine


class Scripted(EngineBase):
    """Answers from a script: phase 1 (a request with a stop) gets `reasoning[i]`, phase 2 gets
    `answer`; every call and its requests are recorded."""

    name = "scripted"

    def __init__(self, reasoning, answer="```json\n[{\"bbox_2d\": [1, 2, 3, 4]}]\n```"):
        self.reasoning, self.answer, self.calls = reasoning, answer, []

    def generate(self, requests):
        self.calls.append(list(requests))
        out = []
        for req in requests:
            i = int(req.id)
            if req.stop:
                text, tokens = self.reasoning[i]
                out.append(Completion(text, tokens, 0.5))
            elif req.assistant_prefix:
                out.append(Completion(self.answer, 7, 0.25))
            else:
                out.append(Completion("plain " + self.answer, 30, 1.0))
        return out

    def close(self):
        pass


def scripted_requests(n):
    return [Request(str(i), f"/img{i}.png", f"prompt {i}") for i in range(n)]


def test_budget_closes_naturally_or_is_forced():
    engine = Scripted([("I see it.\n" + END_THINK, 5), ("a long reasoning cut off", 16)])
    out = generate_with_budget(engine, scripted_requests(2), 16, ANSWER)
    phase1, phase2 = engine.calls
    assert all(r.max_tokens == 16 and r.stop == (END_THINK,) and r.assistant_prefix == "" for r in phase1)
    assert all(r.max_tokens == ANSWER and r.stop == () for r in phase2)
    # Closed by the model: continued as it is, nothing forced.
    assert phase2[0].assistant_prefix == "I see it.\n" + END_THINK
    assert out[0].closed_naturally and out[0].forced_text == ""
    assert out[0].text == "I see it.\n" + END_THINK + engine.answer
    # Not closed within the budget: "\n</think>\n\n" appended, then the answer.
    assert phase2[1].assistant_prefix == "a long reasoning cut off" + FORCED_CLOSE
    assert not out[1].closed_naturally and out[1].forced_text == FORCED_CLOSE
    assert out[1].text == "a long reasoning cut off" + FORCED_CLOSE + engine.answer
    assert out[1].reasoning_text == "a long reasoning cut off" and out[1].answer_text == engine.answer
    # Both generations are counted, the forced text is not.
    assert (out[1].reasoning_tokens, out[1].answer_tokens, out[1].completion_tokens) == (16, 7, 23)
    assert out[1].latency_s == pytest.approx(0.75)
    assert (out[1].phase1_latency_s, out[1].phase2_latency_s) == (0.5, 0.25)


def test_budget_zero_closes_at_once_and_unlimited_is_one_plain_generation():
    engine = Scripted([])
    out = generate_with_budget(engine, scripted_requests(2), 0, ANSWER)
    assert len(engine.calls) == 1  # no reasoning phase
    assert [r.assistant_prefix for r in engine.calls[0]] == [FORCED_CLOSE] * 2
    assert out[0].text == FORCED_CLOSE + engine.answer
    assert (out[0].reasoning_tokens, out[0].completion_tokens, out[0].phase1_latency_s) == (0, 7, 0.0)

    engine = Scripted([])
    requests = scripted_requests(2)
    out = generate_with_budget(engine, requests, None, ANSWER)
    assert engine.calls == [requests]  # the requests predict sends, untouched
    assert out[0].text == "plain " + engine.answer and out[0].completion_tokens == 30
    assert out[0].budget is None and out[0].forced_text == "" and not out[0].closed_naturally


def test_budget_labels_and_batches():
    assert [parse_budget(v) for v in (0, 16, "16", "unlimited", None)] == [0, 16, 16, None, None]
    for bad in (-1, 1.5, "many", "-3", True):
        with pytest.raises((ValueError, TypeError)):
            parse_budget(bad)
    reqs = [replace(r, max_tokens=m) for r, m in zip(scripted_requests(5), (4, 4, None, 4, 4))]
    assert batches_by_settings(reqs, 1) == [[0], [1], [2], [3], [4]]
    assert batches_by_settings(reqs, 8) == [[0, 1], [2], [3, 4]]


# --------------------------------------------------------------------------- the real tiny model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-images")
    paths = []
    for i, colour in enumerate(("red", "blue", "green", "yellow")):
        img = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(img).rectangle((8 + 9 * i, 12, 50 + 9 * i, 70), fill=colour)
        paths.append(root / f"img{i}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def requests_(images):
    sents = ["the red square", "the blue rectangle on the left", "the green square", "the small yellow one"]
    return [Request(str(i), str(p), PROMPTS["qwen3"].format(sent=s)) for i, (p, s) in enumerate(zip(images, sents))]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = HFEngine(str(tiny_dir), SamplingOptions(max_tokens=24), batch_size=4)
    yield eng
    eng.close()


def test_tiny_budget_forces_the_close_exactly_at_the_budget(engine, requests_):
    budget = 3
    plain = engine.generate([replace(r, max_tokens=budget) for r in requests_])
    out = generate_with_budget(engine, requests_, budget, ANSWER)
    not_closed = [o for o in out if not o.closed_naturally]
    assert not_closed, "a 3-token budget closed every reasoning: pick a smaller one"
    for o, reference in zip(out, plain):
        if o.closed_naturally:
            continue
        # Phase 1 is the model's own first N tokens (greedy), cut at the budget...
        assert o.reasoning_tokens == budget
        assert o.reasoning_text == reference.text
        # ... then the forced text, right there, then the answer of phase 2.
        assert o.text == reference.text + FORCED_CLOSE + o.answer_text
        assert o.text.index(FORCED_CLOSE) == len(reference.text)
        assert 1 <= o.answer_tokens <= ANSWER
        assert o.completion_tokens == budget + o.answer_tokens
        assert o.latency_s == pytest.approx(o.phase1_latency_s + o.phase2_latency_s)
        assert o.phase1_latency_s > 0 and o.phase2_latency_s > 0
        # Whatever the random model answered goes through the paper's parser: a box or unparseable.
        result = evaluate_answer(o.text, [10.0, 10.0, 50.0, 60.0], 96, 96)
        assert (result["parsed_box"] is None) == (parse_box(o.text) is None)
        assert 0.0 <= result["iou"] <= 1.0


def test_tiny_phase_two_continues_the_forced_prefix(engine, requests_):
    out = generate_with_budget(engine, requests_[:2], 2, ANSWER)
    for o, req in zip(out, requests_[:2]):
        prefix = o.text[: len(o.text) - len(o.answer_text)]
        again = engine.generate([replace(req, assistant_prefix=prefix, max_tokens=ANSWER)])[0]
        assert again.text == o.answer_text  # phase 2 is the continuation of that exact prefix


def test_tiny_budget_zero_and_unlimited(engine, requests_):
    zero = generate_with_budget(engine, requests_, 0, ANSWER)
    for o in zero:
        assert o.text.startswith(FORCED_CLOSE) and o.forced_text == FORCED_CLOSE
        assert (o.reasoning_tokens, o.phase1_latency_s) == (0, 0.0)
        assert o.completion_tokens == o.answer_tokens >= 1
    plain = engine.generate(requests_)  # what predict sends and keeps
    unlimited = generate_with_budget(engine, requests_, None, ANSWER)
    assert [o.text for o in unlimited] == [c.text for c in plain]
    assert [o.completion_tokens for o in unlimited] == [c.completion_tokens for c in plain]
    assert all(o.answer_tokens == 0 and o.forced_text == "" for o in unlimited)


def test_tiny_natural_close_path(engine, requests_, monkeypatch):
    """The closing tag the model writes itself ends phase 1 and is kept. The random model never
    writes `</think>` early, but it writes other single added tokens (`<think>`, `<|im_start|>`,
    ...) within 64 tokens for some of these requests: with such a token as the closing tag, the
    natural path runs on the real engine."""
    from egm.models import tiny

    budget = 64
    plain = engine.generate([replace(r, max_tokens=budget) for r in requests_])
    # Any added token but the ones that end generation; which one the random weights write
    # for some requests and not others depends on their draw.
    candidates = [t for t in tiny.THINK_TOKENS + tiny.SPECIAL_TOKENS if t not in (tiny.END_THINK, tiny.IM_END, tiny.ENDOFTEXT)]
    split = [t for t in candidates if 0 < sum(t in c.text for c in plain) < len(plain)]
    assert split, f"no added token among {candidates} in some answers and not others: {[c.text for c in plain]}"
    marker = split[0]
    monkeypatch.setattr(bf, "END_THINK", marker)
    out = generate_with_budget(engine, requests_, budget, ANSWER)
    closed = [marker in c.text for c in plain]
    for o, c, natural in zip(out, plain, closed):
        assert o.closed_naturally == natural
        if natural:
            # Stopped right after the tag (kept), and continued without forcing anything.
            assert o.forced_text == "" and o.reasoning_text.endswith(marker)
            assert o.reasoning_text == c.text[: c.text.index(marker) + len(marker)]
            assert o.reasoning_tokens < budget
            assert o.text == o.reasoning_text + o.answer_text
        else:
            assert o.forced_text == FORCED_CLOSE and o.reasoning_tokens == c.completion_tokens


def test_fast_engine_forces_the_budget_like_hf(tiny_dir, engine, requests_):
    """The fast hf path (decode: graph; eager on CPU) under budget forcing: same answers, same counts."""
    from egm.infer.engine import load_engine
    from egm.infer.fast.engine import FastHFEngine

    fast = load_engine("hf", str(tiny_dir), SamplingOptions(max_tokens=24),
                       {"batch_size": 4, "decode": "graph", "length_bucket": 16, "data_parallel_size": 1})
    try:
        assert isinstance(fast, FastHFEngine)
        for budget in (0, 3, None):
            ours = generate_with_budget(fast, requests_, budget, ANSWER)
            reference = generate_with_budget(engine, requests_, budget, ANSWER)
            assert [o.text for o in ours] == [o.text for o in reference]
            assert [(o.reasoning_tokens, o.answer_tokens) for o in ours] == \
                [(o.reasoning_tokens, o.answer_tokens) for o in reference]
    finally:
        fast.close()


def test_hf_stop_strings_must_be_single_tokens(engine, requests_):
    with pytest.raises(ValueError, match="single tokens"):
        engine.generate([replace(requests_[0], stop=("the end",))])


# --------------------------------------------------------------------------- the sweep of one model


def make_split(root, name, n):
    images = root / "images" / "coco" / "train2014"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        file = f"COCO_train2014_{name.replace('coco', 'c')}_{i:04d}.jpg"  # a lower-case "coco" would relocate it
        Image.new("RGB", (96, 96), (30 * i % 255, 90, 160)).save(images / file)
        lines.append(json.dumps({"id": i, "image": f"/data/coco/train2014/{file}", "sent": f"the shape {i}",
                                 "bbox": [10, 10, 50, 60], "width": 96, "height": 96}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_one_engine_load_resume_and_predict_parity(tiny_dir, tmp_path):
    from egm.infer.predict import predict_model

    splits = [make_split(tmp_path, "refcoco_val", 5), make_split(tmp_path, "refcoco_testA", 5)]
    loads = []
    sampling = SamplingOptions(max_tokens=16)

    def get_engine():
        loads.append(1)
        return HFEngine(str(tiny_dir), sampling, batch_size=4)

    out, work = tmp_path / "scaling", tmp_path / "work"
    args = dict(model="tiny", split_files=splits, image_root=str(tmp_path / "images"), get_engine=get_engine,
                tokenizer_dir=str(tiny_dir), prompt_template="qwen3", budgets=[0, 4, None], answer_max_tokens=ANSWER,
                n_per_split=3, seed=0, out_dir=out, work_dir=work)
    metrics = sweep_model(**args)
    assert len(loads) == 1  # one engine for every budget
    assert [m["budget"] for m in metrics] == ["0", "4", "unlimited"]
    rows = {b: [json.loads(line) for line in (out / f"budget-{b}.jsonl").read_text().splitlines()]
            for b in ("0", "4", "unlimited")}
    assert [len(r) for r in rows.values()] == [6, 6, 6]  # 3 seeded records of each split
    assert [r["id"] for r in rows["0"]] == [r["id"] for r in rows["unlimited"]]
    for row in rows["4"]:
        for field in ("split", "line", "answer", "parsed_box", "iou", "completion_tokens", "latency_s", "budget",
                      "closed_naturally", "reasoning_tokens", "answer_tokens", "forced_text"):
            assert field in row
        assert row["completion_tokens"] == row["reasoning_tokens"] + row["answer_tokens"]
        if not row["closed_naturally"]:
            assert row["reasoning_tokens"] == 4 and FORCED_CLOSE in row["answer"]
    m4 = json.loads((out / "budget-4.json").read_text())
    assert m4["n_scored"] == 6 and m4["reasoning_model"] is True
    assert m4["closed_share"] == sum(r["closed_naturally"] for r in rows["4"]) / 6
    assert set(m4["per_split"]) == {"refcoco_val", "refcoco_testA"}

    # The unlimited budget is predict's answer, record for record.
    class Shared:
        def __init__(self):
            self.engine = get_engine()

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def close(self):
            self.engine.close()

    pred = tmp_path / "pred"
    predict_model(splits, pred, str(tmp_path / "images"), Shared, "qwen3", 4, "key")
    predicted = {}
    for path in splits:
        for line in (pred / path.name).read_text().splitlines():
            row = json.loads(line)
            predicted[(row["split"], row["line"])] = row["answer"]
    for row in rows["unlimited"]:
        assert row["answer"] == predicted[(row["split"], row["line"])]

    # A rerun finds every budget in the resume cache: no engine is loaded.
    loads.clear()
    (out / "budget-4.jsonl").unlink()
    sweep_model(**args)
    assert loads == []
    assert len((out / "budget-4.jsonl").read_text().splitlines()) == 6


def test_sweep_refuses_to_force_a_model_without_reasoning(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bf, "opens_reasoning", lambda tokenizer: False)
    split = make_split(tmp_path, "refcoco_val", 2)
    with pytest.raises(ValueError, match="single_point"):
        sweep_model("instruct", [split], str(tmp_path / "images"), lambda: None, str(tiny_dir), "qwen3",
                    [0, None], ANSWER, None, 0, tmp_path / "out")


def test_tiny_template_opens_reasoning(tiny_dir):
    from transformers import AutoTokenizer

    assert bf.opens_reasoning(AutoTokenizer.from_pretrained(str(tiny_dir)))


# --------------------------------------------------------------------------- other backends' requests


def test_vllm_and_sglang_requests_carry_prefix_budget_and_stop(tiny_dir):
    from transformers import AutoTokenizer

    from egm.infer.backends.sglang import sglang_inputs, sglang_request_params
    from egm.infer.backends.vllm import vllm_prompt, vllm_request_sampling_kwargs
    from egm.models.inputs import render_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    sampling = SamplingOptions(max_tokens=4096)
    plain = Request("1", "/img.png", "Locate the cat, output its bbox coordinates using JSON format")
    phase1 = replace(plain, max_tokens=16, stop=(END_THINK,))
    phase2 = replace(plain, assistant_prefix="I see a cat" + FORCED_CLOSE, max_tokens=ANSWER)
    base = render_prompt(tok, plain.prompt)
    assert base.endswith("<|im_start|>assistant\n<think>\n")

    assert vllm_prompt(tok, plain, None)["prompt"] == base
    assert vllm_prompt(tok, phase2, None)["prompt"] == base + "I see a cat\n</think>\n\n"
    assert vllm_request_sampling_kwargs(sampling, plain) == vllm_request_sampling_kwargs(sampling)
    kw = vllm_request_sampling_kwargs(sampling, phase1)
    assert (kw["max_tokens"], kw["stop"], kw["include_stop_str_in_output"]) == (16, [END_THINK], True)
    assert vllm_request_sampling_kwargs(sampling, phase2)["max_tokens"] == ANSWER

    prompts, images = sglang_inputs(tok, [plain, phase2])
    assert prompts == [base, base + "I see a cat\n</think>\n\n"] and images == ["/img.png"] * 2
    assert sglang_request_params(sampling, plain) == sglang_request_params(sampling)
    params = sglang_request_params(sampling, phase1)
    assert (params["max_new_tokens"], params["stop"], params["no_stop_trim"]) == (16, [END_THINK], True)


def test_server_request_continues_the_final_assistant_message():
    from egm.infer.backends import client as cl

    sampling = SamplingOptions(max_tokens=4096)
    plain = cl.request_body("egm", "data:image/png;base64,AA", "Locate it", sampling)
    assert [m["role"] for m in plain["messages"]] == ["user"]
    assert "continue_final_message" not in plain and "stop" not in plain

    phase1 = cl.request_body("egm", "data:image/png;base64,AA", "Locate it", sampling, max_tokens=16, stop=(END_THINK,))
    assert phase1["max_tokens"] == 16 and phase1["stop"] == [END_THINK]
    assert phase1["include_stop_str_in_output"] is True and phase1["no_stop_trim"] is True  # vLLM's, SGLang's
    assert [m["role"] for m in phase1["messages"]] == ["user"]

    prefix = "I see it" + FORCED_CLOSE
    phase2 = cl.request_body("egm", "data:image/png;base64,AA", "Locate it", sampling, assistant_prefix=prefix,
                             max_tokens=ANSWER)
    assert phase2["messages"][-1] == {"role": "assistant", "content": prefix}
    assert phase2["continue_final_message"] is True and phase2["add_generation_prompt"] is False
    assert phase2["max_tokens"] == ANSWER
    with pytest.raises(ValueError, match="continue"):
        cl.request_body("egm", "data:image/png;base64,AA", "Locate it", sampling, extensions=False,
                        assistant_prefix=prefix)


def test_server_client_sends_the_request_fields():
    """The async client puts a Request's prefix, budget and stop into the body it posts."""
    import base64

    import httpx

    from egm.infer.backends.client import OpenAIChatClient

    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok</think>"}}],
                                         "usage": {"completion_tokens": 3}})

    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".png") as img:
        img.write(base64.b64decode("iVBORw0KGgo="))
        img.flush()
        client = OpenAIChatClient("http://server/v1", "egm", SamplingOptions(), concurrency=2,
                                  transport=httpx.MockTransport(handler))
        req = Request("1", img.name, "Locate it")
        got = []
        client.run([replace(req, max_tokens=8, stop=(END_THINK,)), replace(req, assistant_prefix=FORCED_CLOSE)],
                   lambda i, c: got.append((i, c)))
    by_prefix = {len(b["messages"]): b for b in bodies}
    assert by_prefix[1]["stop"] == [END_THINK] and by_prefix[1]["max_tokens"] == 8
    assert by_prefix[2]["messages"][-1]["content"] == FORCED_CLOSE and by_prefix[2]["continue_final_message"]
    assert sorted(i for i, _ in got) == [0, 1]

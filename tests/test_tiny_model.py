import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from egm.grounding import PROMPTS, format_sft_target
from egm.models.inputs import build_inputs, load_processor_parts, load_rgb_images, render_prompt, token_id
from egm.models.tiny import write_tiny_model


@pytest.fixture(scope="session")
def parts(tiny_dir):
    return load_processor_parts(tiny_dir)


def _weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def test_directory_is_complete_and_leaves_no_temp(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "preprocessor_config.json", "generation_config.json"):
        assert required in names
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["model"]


def test_model_reloads_with_the_real_class(tiny_dir, parts):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    tokenizer, _ = parts
    cfg = model.config
    assert cfg.model_type == "qwen3_vl"
    assert cfg.text_config.vocab_size == len(tokenizer)
    assert cfg.text_config.hidden_size == 128 and cfg.text_config.num_hidden_layers == 2
    assert cfg.text_config.rope_parameters["mrope_section"] == [8, 4, 4]
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    assert all(i < cfg.vision_config.depth for i in cfg.vision_config.deepstack_visual_indexes)
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["do_sample"] is True
    assert gen["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == tokenizer.pad_token_id
    saved = _weights(tiny_dir)
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name


def test_same_seed_same_weights_other_seed_differs(tiny_dir, tmp_path):
    write_tiny_model(tmp_path / "again", seed=0)
    write_tiny_model(tmp_path / "other", seed=1)
    base, again, other = _weights(tiny_dir), _weights(tmp_path / "again"), _weights(tmp_path / "other")
    assert base.keys() == again.keys() == other.keys()
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert any(not torch.equal(base[k], other[k]) for k in base)
    # The vocabulary does not depend on the seed.
    assert (tiny_dir / "tokenizer.json").read_bytes() == (tmp_path / "other" / "tokenizer.json").read_bytes()


def test_rewrite_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("left over")
    write_tiny_model(out, seed=3)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tokenizer(parts):
    tokenizer, _ = parts
    assert 320 <= len(tokenizer) <= 400
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    target = format_sft_target(
        "The image shows the red circle left of the blue square. The target is the red circle.",
        [12, 340, 999, 1000],
        "the red circle",
    )
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == target
    for token in ("</think>", "<think>", "<|image_pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>"):
        single = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert single == [tokenizer.convert_tokens_to_ids(token)], token
    assert ids.count(tokenizer.convert_tokens_to_ids("</think>")) == 1
    for digit in "0123456789":
        assert len(tokenizer(digit, add_special_tokens=False)["input_ids"]) == 1
    # No merge spans two digits: a coordinate is one token per digit.
    assert len(tokenizer("1000", add_special_tokens=False)["input_ids"]) == 4
    # Any text encodes and decodes, thanks to the full byte alphabet.
    odd = "Zebra café ~ 42 €"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd
    # The think markers survive skip_special_tokens, as in Qwen3.
    assert "</think>" in tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_template(parts):
    tokenizer, _ = parts
    prompt = PROMPTS["qwen3"].format(sent="the red circle")
    expected = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert render_prompt(tokenizer, prompt) == expected
    no_gen = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False,
        add_generation_prompt=False,
    )
    assert no_gen == expected[: -len("<|im_start|>assistant\n<think>\n")]
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_assistant_turn_extends_generation_prompt(parts):
    tokenizer, _ = parts
    prompt = PROMPTS["qwen3"].format(sent="the red circle")
    target = format_sft_target("The target is the red circle.", [1, 2, 3, 4], "the red circle")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": target},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == render_prompt(tokenizer, prompt) + target + "<|im_end|>\n"


def test_inputs_have_nine_image_tokens_per_96px_image(parts):
    tokenizer, image_processor = parts
    images = [Image.new("RGB", (96, 96), c) for c in ("red", "blue")]
    prompts = [PROMPTS["qwen3"].format(sent="the red circle"), PROMPTS["qwen3"].format(sent="x")]
    inputs = build_inputs(images, prompts, tokenizer, image_processor)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6], [1, 6, 6]]
    assert inputs["pixel_values"].shape == (72, 3 * 2 * 16 * 16)
    assert ((inputs["input_ids"] == image_id).sum(dim=1) == 9).all()
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_id).long())
    # Left padding: the shorter prompt is padded at the front, every row ends on the prompt.
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]
    assert (inputs["input_ids"][1][mask[1] == 0] == tokenizer.pad_token_id).all()
    # A non-square image is resized to about the same pixel budget.
    other = build_inputs([Image.new("RGB", (160, 60))], ["x"], tokenizer, image_processor)
    t, h, w = other["image_grid_thw"][0].tolist()
    assert (other["input_ids"] == image_id).sum() == t * h * w // 4


def test_token_id_is_the_vocabulary_s_or_none(parts):
    tokenizer, _ = parts
    vocab = tokenizer.get_vocab()
    assert token_id(tokenizer, "<|image_pad|>") == vocab["<|image_pad|>"]
    assert token_id(tokenizer, "<|video_pad|>") == vocab["<|video_pad|>"]
    # A missing token is None, not unk or pad (build_inputs would mark those as video).
    assert "<|no_such_token|>" not in vocab and token_id(tokenizer, "<|no_such_token|>") is None


def test_image_ids_expanded_after_tokenising_equal_the_expanded_text_tokenised(parts):
    """build_inputs tokenises one placeholder per image and expands its id; that must give the ids
    and mask of tokenising the text with every visual token spelled out (padding included)."""
    tokenizer, image_processor = parts
    images = [Image.new("RGB", (96, 96), "red"), Image.new("RGB", (160, 60), "blue")]
    prompts = [PROMPTS["qwen3"].format(sent="the <b>left</b> one"), "x"]
    prefixes = ["<think>\nThe", ""]
    inputs = build_inputs(images, prompts, tokenizer, image_processor, prefixes=prefixes)
    texts = [render_prompt(tokenizer, p).replace("<|image_pad|>", "<|image_pad|>" * (int(g.prod()) // 4)) + pre
             for p, g, pre in zip(prompts, inputs["image_grid_thw"], prefixes)]
    spelled = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(inputs["input_ids"], spelled["input_ids"])
    assert torch.equal(inputs["attention_mask"], spelled["attention_mask"])
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        build_inputs(images[:1], ["<|image_pad|> twice"], tokenizer, image_processor)


def test_images_load_in_threads_in_order_as_rgb(tmp_path):
    paths = []
    for i, mode in enumerate(["L", "RGBA", "RGB", "P"]):
        path = tmp_path / f"{i}.png"
        Image.new(mode, (8 + i, 8)).save(path)
        paths.append(str(path))
    # An RGB JPEG is handed on as decoded, after its file is closed: the same pixels as a converted copy.
    jpeg = tmp_path / "photo.jpg"
    Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(jpeg, quality=90)
    images = load_rgb_images(paths + [str(jpeg)])
    assert [im.size for im in images] == [(8, 8), (9, 8), (10, 8), (11, 8), (40, 30)]
    assert {im.mode for im in images} == {"RGB"}
    with Image.open(jpeg) as img:
        assert images[-1].tobytes() == img.convert("RGB").tobytes() and len(img.convert("RGB").getcolors(4096) or ()) > 10
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb_images(paths + [str(tmp_path / "missing.png")])


def test_processor_parts_load_a_real_style_config(tiny_dir, tmp_path):
    # Real Qwen3-VL directories name the torchvision class and a large pixel budget.
    import shutil

    real = tmp_path / "real"
    shutil.copytree(tiny_dir, real)
    cfg = json.loads((real / "preprocessor_config.json").read_text())
    cfg.update({"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
                "size": {"longest_edge": 16777216, "shortest_edge": 65536}})
    (real / "preprocessor_config.json").write_text(json.dumps(cfg))
    _, image_processor = load_processor_parts(real)
    assert image_processor.patch_size == 16 and image_processor.merge_size == 2
    assert image_processor.size["shortest_edge"] == 65536


def test_inputs_match_the_real_qwen3vl_processor(parts, monkeypatch):
    # Qwen3VLProcessor cannot be built here only because its class check looks up the video
    # processor (torchvision); with that check skipped it runs, and build_inputs must agree.
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tokenizer, image_processor = parts
    monkeypatch.setattr(Qwen3VLProcessor, "check_argument_for_proper_class", lambda self, name, arg: None)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                 chat_template=tokenizer.chat_template)
    images = [Image.new("RGB", (96, 96), "red"), Image.new("RGB", (130, 70), "blue"),
              Image.new("RGB", (40, 300), "green")]
    prompts = [PROMPTS["qwen3"].format(sent="the red circle"), "x y", "z"]
    expected = processor(images=images, text=[render_prompt(tokenizer, p) for p in prompts],
                         padding=True, padding_side="left", return_tensors="pt")
    mine = build_inputs(images, prompts, tokenizer, image_processor)
    for key, value in mine.items():
        assert torch.equal(expected[key], value), key

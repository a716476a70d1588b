"""The embedded demo model: a tiny random-weight Qwen3-VL built from the real transformers classes.

It is saved as an ordinary Hugging Face model directory (config, safetensors weights, tokenizer,
chat template, image-processor config, generation config), so the code that loads the real
Qwen3-VL-*-Thinking / EGM checkpoints loads this one unchanged. Nothing is downloaded: the
tokenizer is trained here on a synthetic corpus of the task's own strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from egm.grounding import GRID, PROMPTS, SFT_PROMPT, format_sft_target
from egm.io import atomic_dir

# Sizes were picked for learning speed on a 2-core CPU, not for quality.
TEXT_HIDDEN = 128
TEXT_MLP = 256
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = 32
# Sums to HEAD_DIM // 2 (one rotary frequency per pair of channels), split T/H/W like Qwen3-VL.
MROPE_SECTION = [8, 4, 4]
ROPE_THETA = 5_000_000.0
MAX_POSITIONS = 4096

VISION_DEPTH = 2
VISION_HIDDEN = 64
VISION_MLP = 128
VISION_HEADS = 4
PATCH = 16
MERGE = 2
TEMPORAL_PATCH = 2
# Learned position grid of 12x12, resampled per image (the real model's is 48x48).
VISION_POSITIONS = 144
VISION_POS_STD = 1.0
DEEPSTACK = [1]

# Every image becomes exactly 96x96 -> 6x6 patches -> 9 merged visual tokens.
IMAGE_SIDE = 96
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
# Qwen3-VL normalises to [-1, 1] rather than with CLIP's statistics.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

# 256 byte symbols plus ~135 learned merges; with the 9 added tokens exactly 400 ids. The full
# byte alphabet costs most of the budget but means any text encodes without a lost character.
BPE_VOCAB = 391
# The corpus is fixed so every seed shares one vocabulary; only the weights follow the seed.
CORPUS_SEED = 1234
CORPUS_LINES = 1500

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
# Qwen3 keeps the think markers as plain added tokens, so skip_special_tokens leaves them in.
THINK_TOKENS = [THINK, END_THINK]

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"]
SHAPES = ["circle", "square", "triangle", "rectangle", "star", "diamond", "ellipse", "hexagon", "cross"]
SIZES = ["small", "large", "big", "tiny"]
RELATIONS = ["left of", "right of", "above", "below", "next to", "near", "under", "on top of"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "in the corner"]

# Mirrors the Qwen3-VL-Thinking template for what this project sends: one user turn with the
# image first, no system prompt by default, and a generation prompt that opens the reasoning
# block. An assistant turn holding `</think>` is rendered as `<think>\n{reasoning}\n</think>\n\n
# {answer}` so that a rendered SFT conversation equals the generation prompt plus the target.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set parts.text = parts.text + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set parts.text = parts.text + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif 'text' in item -%}"
    "{%- set parts.text = parts.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = parts.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set answer = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + answer -}}"
    "{%- else -%}"
    "{{- answer -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- content -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- endif -%}"
)


def _phrase(rng: random.Random) -> str:
    parts = ["the"]
    if rng.random() < 0.3:
        parts.append(rng.choice(SIZES))
    parts += [rng.choice(COLOURS), rng.choice(SHAPES)]
    roll = rng.random()
    if roll < 0.35:
        parts += [rng.choice(RELATIONS), "the", rng.choice(COLOURS), rng.choice(SHAPES)]
    elif roll < 0.55:
        parts.append(rng.choice(PLACES))
    return " ".join(parts)


def _reasoning(rng: random.Random, sent: str) -> str:
    other = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
    templates = [
        f"The image shows {sent} and {other}. The target is {sent}.",
        f"I see {other} {rng.choice(PLACES)}. The target is {sent}, so I locate it.",
        f"The user asks for {sent}. The image shows it {rng.choice(PLACES)}.",
        f"There is {other} {rng.choice(RELATIONS)} {sent}. The target is {sent}.",
    ]
    return rng.choice(templates)


def _box(rng: random.Random) -> list[int]:
    x1, x2 = sorted(rng.sample(range(GRID + 1), 2))
    y1, y2 = sorted(rng.sample(range(GRID + 1), 2))
    return [x1, y1, x2, y2]


def _corpus() -> list[str]:
    rng = random.Random(CORPUS_SEED)
    lines = ["system user assistant", "You are a helpful assistant."]
    for _ in range(CORPUS_LINES):
        sent = _phrase(rng)
        lines.append(PROMPTS["qwen3"].format(sent=sent))
        lines.append(SFT_PROMPT.format(sent=sent))
        lines.append(format_sft_target(_reasoning(rng, sent), _box(rng), sent))
    return lines


def build_tokenizer():
    """Byte-level BPE with one token per digit and Qwen3-VL's special tokens as single ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first, so no merge ever spans two digits: coordinates stay digit-by-digit as in Qwen.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        # All 256 byte symbols, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # The PIL backend: the torchvision one cannot be imported here, and both read the same config.
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS},
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def build_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_MLP,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "mrope_section": list(MROPE_SECTION),
            "mrope_interleaved": True,
        },
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        dtype="float32",
    )
    vision = dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_MLP,
        num_heads=VISION_HEADS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=TEXT_HIDDEN,
        num_position_embeddings=VISION_POSITIONS,
        deepstack_visual_indexes=list(DEEPSTACK),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_generation_config(tokenizer):
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    # do_sample on, so a caller's temperature/seed take effect; callers wanting greedy say so.
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=20,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=pad,
    )


def portable_tokenizer_config(model_dir: Path) -> None:
    # transformers 5 records its internal class name (TokenizersBackend), which 4.x stacks (as
    # pinned by some engines) do not know; PreTrainedTokenizerFast names the same thing in both.
    # The template also goes into the JSON because 4.x before chat_template.jinja reads it there.
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_model(out_dir: Path, seed: int = 0) -> None:
    """Write the tiny model directory; the same seed always gives the same weights.

    The directory is assembled beside `out_dir` and renamed into place only when complete, so a
    killed run leaves either no `out_dir` or a complete one (plus a stray temp dir), never a
    partial one.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)

    # Seed just around construction so weights depend on `seed` alone, then restore the caller's RNG.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
        with torch.no_grad():
            # At transformers' default init (std 0.02) the ViT's learned positions are too weak
            # beside the patch embedding for the visual tokens to say where a shape is, and the
            # model stays blind for most of the demo's SFT (docs/training.md, "The demo").
            model.model.visual.pos_embed.weight.normal_(0.0, VISION_POS_STD)
    finally:
        torch.random.set_rng_state(rng_state)
    model.generation_config = build_generation_config(tokenizer)

    with atomic_dir(out_dir) as tmp:
        # transformers 5 always writes safetensors.
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        portable_tokenizer_config(tmp)
        build_image_processor().save_pretrained(tmp)

"""The paper's Qwen3-VL architectures as model directories, with the demo's tokenizer.

The real checkpoints cannot be downloaded where the GPU benchmarks and the GPU smoke run happen,
so those build the architecture itself (EGM.md section 6): the same layer shapes, vocabulary and
vision tower, and the demo's tokenizer, whose special tokens the config points at. Only the token
ids of ordinary text differ from the real model, which costs nothing in time.

A directory written with `weights=False` holds the config, tokenizer and image processor (the
released model's preprocessing, not the demo's 96x96) only:
vLLM builds it with `load_format: dummy`, the hf backend with `load_format: dummy` (seeded random
init), and neither needs 17 GB of random numbers on disk.
"""

from __future__ import annotations

from pathlib import Path

# EGM.md section 6. Every architecture: rope theta 5e6, interleaved mrope; vision patch 16,
# spatial merge 2, temporal patch 2; merger output = text hidden.
ARCHS = {
    "qwen3-vl-2b": dict(hidden=2048, mlp=6144, layers=28, heads=16, kv=8, head_dim=128, tied=True, vocab=151936,
                        mrope=[24, 20, 20], v_depth=24, v_hidden=1024, v_mlp=4096, v_heads=16,
                        deepstack=[5, 11, 17], positions=2304),
    "qwen3-vl-4b": dict(hidden=2560, mlp=9728, layers=36, heads=32, kv=8, head_dim=128, tied=True, vocab=151936,
                        mrope=[24, 20, 20], v_depth=24, v_hidden=1024, v_mlp=4096, v_heads=16,
                        deepstack=[5, 11, 17], positions=2304),
    # Untied: its 1.245 GB input embedding table is separate from lm_head (8.767e9 parameters).
    "qwen3-vl-8b": dict(hidden=4096, mlp=12288, layers=36, heads=32, kv=8, head_dim=128, tied=False, vocab=151936,
                        mrope=[24, 20, 20], v_depth=27, v_hidden=1152, v_mlp=4304, v_heads=16,
                        deepstack=[8, 16, 24], positions=2304),
    # The GPU scripts' CPU smoke runs: the shapes above, shrunk until a step takes milliseconds.
    "tiny": dict(hidden=128, mlp=256, layers=2, heads=4, kv=2, head_dim=32, tied=False, vocab=1000,
                 mrope=[8, 4, 4], v_depth=2, v_hidden=64, v_mlp=128, v_heads=4, deepstack=[1], positions=144),
}


def tokenizer_ids(tokenizer) -> dict:
    """The special-token ids `architecture_config` needs, as `tokenizer` numbers them."""
    from egm.models import tiny

    names = {"im_end": tiny.IM_END, "endoftext": tiny.ENDOFTEXT, "vision_start": tiny.VISION_START,
             "vision_end": tiny.VISION_END, "image_pad": tiny.IMAGE_PAD, "video_pad": tiny.VIDEO_PAD}
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def architecture_config(arch: str, ids: dict):
    """A Qwen3VLConfig of `arch` with the special-token ids `ids` (keys as `tokenizer_ids` gives)."""
    from transformers import Qwen3VLConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    a = ARCHS[arch]
    if max(ids.values()) >= a["vocab"]:
        raise ValueError(f"{arch}: vocabulary {a['vocab']} has no room for token id {max(ids.values())}")
    text = dict(
        vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"], num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"], num_key_value_heads=a["kv"], head_dim=a["head_dim"], hidden_act="silu",
        rms_norm_eps=1e-6, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": a["mrope"],
                         "mrope_interleaved": True},
        tie_word_embeddings=a["tied"], bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"],
    )
    vision = dict(
        depth=a["v_depth"], hidden_size=a["v_hidden"], intermediate_size=a["v_mlp"], num_heads=a["v_heads"],
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=a["hidden"],
        num_position_embeddings=a["positions"], deepstack_visual_indexes=a["deepstack"],
        hidden_act="gelu_pytorch_tanh", in_channels=3,
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=a["tied"],
        # The released checkpoints are bf16; engines that read `dtype: auto` take it from here.
        dtype="bfloat16",
    )


def architecture_image_processor(arch: str):
    """The image preprocessing `arch` is served with: the released Qwen3-VL settings (16-pixel
    patches merged 2x2, images resized to between 65536 and 16777216 pixels), so that a 640x480
    image costs its real 300 visual tokens; the tiny smoke architecture keeps the demo's."""
    from transformers import Qwen2VLImageProcessorPil

    from egm.models import tiny

    if arch == "tiny":
        return tiny.build_image_processor()
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                    temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                    image_std=[0.5, 0.5, 0.5])


def write_architecture_model(out_dir: Path, arch: str, weights: bool = False, device: str = "cpu", seed: int = 0) -> int:
    """Write `arch` as a model directory (atomically); returns its parameter count.

    With `weights`, random bf16 weights (seeded) are built on `device` and saved; without, the
    directory has no weights and the count comes from a model built on the meta device.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from egm.io import atomic_dir
    from egm.models import tiny

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.build_tokenizer()
    config = architecture_config(arch, tokenizer_ids(tokenizer))
    previous = torch.get_default_dtype()
    # Built in bf16 directly: an fp32 build of the 8B is twice the memory.
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(seed)
        with torch.device(device if weights else "meta"):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out_dir) as tmp:
        if weights:
            model.generation_config = tiny.build_generation_config(tokenizer)
            model.save_pretrained(tmp)
        else:
            # save_pretrained writes this from the model; a bare config has none, and vLLM picks
            # its runner from it (without it the directory is not a generative model).
            config.architectures = [type(model).__name__]
            config.save_pretrained(tmp)
            tiny.build_generation_config(tokenizer).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tiny.portable_tokenizer_config(tmp)
        architecture_image_processor(arch).save_pretrained(tmp)
    del model
    return n_params

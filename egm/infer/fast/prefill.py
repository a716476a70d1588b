"""The prompt pass of the fast hf decode, with no host round trip inside it, so a CUDA graph holds it.

The model's own forward is host-bound at small batches (on the H200, 59 ms for the 8B at batch
1 against about 10 ms of arithmetic at the measured matrix rate): thousands of small kernels
launched one by one, the vision tower's attention split by image with lengths read back from
the GPU, the 3D rope index built by a Python loop over tokens, the DeepStack features scattered
through boolean masks (each a sync). Here the work is split in two:

- `Prefiller.plan` (host, per batch): what depends only on shapes and token layout, from the CPU
  copies of the processor's small tensors: the 3D text positions and rope deltas (the model's
  own `get_rope_index`), where the image tokens sit, the patch count of each image, and per
  image size (cached) the vision tower's position embeddings and rotary tables;
- device work of fixed shapes: `Prefiller.vision` (patch embedding plus position embedding, the
  vision blocks with attention per image, images of one size in one batched call, the DeepStack
  mergers and the merger), then `egm.infer.fast.decoder.GraphDecoder.run_prefill` for the text: token
  embeddings with the image features written at the image tokens, every layer with the
  decoder's fused weights (causal attention under the padding mask, keys and values written
  straight into the decoder's static cache), DeepStack features added after the first layers,
  and the last position's norm, lm_head and argmax.

The vision tables come from the model itself, not a copy of its formulas: the tower is run up to
its first block with the patch embedding giving float32 zeros, so the block receives exactly the
position embedding, and the rotary tables it is handed are taken as they are (`VisionTables`).
Greedy first token only, images only (videos are refused), as the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VisionTables:
    """What the vision tower adds before its first block, for one image or a batch's images."""

    position: object  # [patches, width] float32: the learned position embedding, resampled
    cos: object  # rotary tables as the tower hands them to its blocks
    sin: object


@dataclass
class PrefillPlan:
    """Host-side work for one batch; `key` says which captured graph can run it."""

    key: tuple  # (batch, prompt length, each image's grid)
    position_ids: object  # [3, B, L] long, CPU
    deltas: object  # [B] long, CPU: next text position = valid tokens + delta
    image_index: object  # [visual tokens] long, CPU: flat (row-major) positions of the image tokens
    patches: list[int]  # patches per image, in order
    tables: VisionTables = field(repr=False)


class _ProbeDone(Exception):
    """Raised from the vision tower's first block to stop a probe there."""


def vision_tables(visual, grid_thw, device, dtype) -> VisionTables:
    """The tower's position embedding and rotary tables for these grids ([images, 3]), read off
    the tower itself."""
    import torch

    captured = {}
    patches = int(grid_thw.prod(-1).sum())
    in_width = visual.patch_embed.proj.weight[0].numel()

    def zero_patches(module, args, output):
        return torch.zeros(output.shape, dtype=torch.float32, device=output.device)

    def stop(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rotary"] = kwargs["position_embeddings"]
        raise _ProbeDone

    hooks = [visual.patch_embed.register_forward_hook(zero_patches),
             visual.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)]
    try:
        with torch.inference_mode():
            visual(torch.zeros(patches, in_width, dtype=dtype, device=device), grid_thw=grid_thw.to(device))
    except _ProbeDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if "hidden" not in captured:
        raise RuntimeError("the vision tower did not reach its first block: "
                           "its forward is not the one this prefill knows")
    cos, sin = captured["rotary"]
    return VisionTables(position=captured["hidden"].float(), cos=cos, sin=sin)


class Prefiller:
    """Plans a batch's prompt pass and runs its vision part; the text part is the decoder's
    (`GraphDecoder.run_prefill`), which owns the fused text weights."""

    # Image sizes whose vision tables stay cached: one image's are a few MB (5.5 for 640x480);
    # a batch's are put together from its images' each time, not cached (hundreds of MB at 64).
    TABLES_KEPT = 64

    def __init__(self, model, device, dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.visual = model.model.visual
        self.image_token_id = int(model.config.image_token_id)
        self.merge = int(self.visual.spatial_merge_size)
        self.deepstack_layers = list(getattr(self.visual, "deepstack_visual_indexes", []) or [])
        self._tables: dict[tuple, VisionTables] = {}

    # ---- host ----

    def plan(self, inputs: dict) -> PrefillPlan:
        if inputs.get("pixel_values_videos") is not None:
            raise NotImplementedError("the fast prefill handles images, not videos")
        ids = inputs["input_ids"].cpu()
        mask = inputs["attention_mask"].cpu()
        grid = inputs["image_grid_thw"].cpu()
        mm = inputs["mm_token_type_ids"].cpu()
        position_ids, deltas = self.model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=mask)
        image_index = (ids.reshape(-1) == self.image_token_id).nonzero().squeeze(1)
        patches = [int(n) for n in grid.prod(-1)]
        merged = sum(patches) // self.merge**2
        if image_index.numel() != merged:
            raise ValueError(f"{image_index.numel()} image tokens in the prompts but {merged} image features "
                             f"for grids {grid.tolist()}")
        grids = tuple(tuple(int(v) for v in row) for row in grid.tolist())
        key = (int(ids.shape[0]), int(ids.shape[1]), grids)
        return PrefillPlan(key, position_ids, deltas.view(-1), image_index, patches, self.tables(grids))

    def tables(self, grids: tuple) -> VisionTables:
        """The batch's vision tables: each image size's, probed once, put together in order."""
        import torch

        parts = []
        for grid in grids:
            if grid not in self._tables:
                if len(self._tables) >= self.TABLES_KEPT:
                    self._tables.pop(next(iter(self._tables)))
                self._tables[grid] = vision_tables(self.visual, torch.tensor([grid]), self.device, self.dtype)
            parts.append(self._tables[grid])
        if len(parts) == 1:
            return parts[0]
        return VisionTables(*(torch.cat(column) for column in zip(*((t.position, t.cos, t.sin) for t in parts))))

    # ---- device ----

    def vision(self, plan: PrefillPlan, pixel_values):
        """The merged image features [visual tokens, text width] and the deepstack features."""
        visual = self.visual
        x = visual.patch_embed(pixel_values) + plan.tables.position.to(self.dtype)
        cos, sin = plan.tables.cos, plan.tables.sin
        deepstack = []
        for n, block in enumerate(visual.blocks):
            x = vision_block(block, x, cos, sin, plan.patches)
            if n in self.deepstack_layers:
                deepstack.append(visual.deepstack_merger_list[self.deepstack_layers.index(n)](x))
        return visual.merger(x), deepstack


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vision_block(block, x, cos, sin, patches: list[int]):
    """One vision block as the model computes it (rope in float32), attention within each image."""
    attn = block.attn
    n = x.shape[0]
    q, k, v = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = _vision_rope(q, cos, sin), _vision_rope(k, cos, sin)
    o = image_attention(q, k, v, patches, getattr(attn, "scaling", None) or attn.head_dim**-0.5)
    x = x + attn.proj(o.reshape(n, -1))
    return x + block.mlp(block.norm2(x))


def _vision_rope(t, cos, sin):
    dtype = t.dtype
    t = t.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (t * cos + rotate_half(t) * sin).to(dtype)


def image_attention(q, k, v, patches: list[int], scale: float):
    """Full attention inside each image's patches ([N, heads, hd] each, images back to back).

    Images of one size go through one batched call; sizes are host integers from the plan, so
    nothing here reads the GPU.
    """
    import torch
    import torch.nn.functional as F

    heads, hd = q.shape[1], q.shape[2]
    if len(set(patches)) == 1:
        m, s = len(patches), patches[0]
        q, k, v = (t.view(m, s, heads, hd).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(m * s, heads, hd)
    outs = []
    for qi, ki, vi in zip(q.split(patches), k.split(patches), v.split(patches)):
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


def causal_padding_bias(attention_mask, dtype):
    """Additive [B, 1, L, L] mask: a token sees itself and the earlier tokens that are not padding.

    A padding position sees itself too, so no row is all -inf (that would make NaN keys and values,
    and a masked NaN still poisons attention's value product).
    """
    import torch

    b, length = attention_mask.shape
    positions = torch.arange(length, device=attention_mask.device)
    causal = positions.view(1, length) <= positions.view(length, 1)
    allowed = (causal.view(1, length, length) & attention_mask.view(b, 1, length).bool()) | torch.eye(
        length, dtype=torch.bool, device=attention_mask.device)
    bias = torch.zeros(b, 1, length, length, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~allowed.view(b, 1, length, length), float("-inf"))

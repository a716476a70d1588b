"""A fast transformers path for Qwen3-VL on one GPU: static KV cache, one CUDA graph per decode step.

Plain `generate` spends most of its time launching kernels and waiting on the host (about 10x
the weight-streaming floor for the 8B at batch 1); `cache_implementation="static"` gets to about
1.8x. The decoder here gets closer by removing everything between the GPU and the next token:

- prefill (vision tower + prompt, `egm.infer.fast.prefill`) does its host work first (positions,
  vision tables) and then only device work of fixed shapes, written straight into a
  preallocated static cache of `prompt + max_new` positions, so every decode step has the same
  shapes and addresses; on CUDA a prefill shape seen a second time is captured as a graph too;
- one decode step (embedding, 3D-rope positions, every layer with fused QKV and gate/up
  weights, attention over the static cache, lm_head, greedy argmax, the bookkeeping of
  positions and finished rows) is captured once as a CUDA graph and replayed per token;
  optionally the per-layer pre/post-attention blocks are compiled first (`torch.compile`),
  which fuses norms, rope and the MLP's elementwise work into few kernels;
- at batch 1 the projections, with the norms, the activation and the residuals folded into them,
  go through `egm.infer.fast.kernels` (Triton kernels shaped for one token; on the H200 the 8B
  decoded a token in 4.65 ms through the unfolded ones, vLLM in 5.53), and at every batch the
  attention from the QKV product on (the per-head norms, rope and the cache write in the same
  kernel), which reads the cache only from each row's first prompt position up to the step's;
- the host never waits on the step it has just launched: behind each step its rows' stop flags
  are copied to the host, which reads them after launching `lookahead - 1` more steps. Decoding
  thus ends at most that many steps (one by default) after every row has stopped, and the GPU
  has the next step queued while the host checks.
  (Reading one flag per 16 steps, blocking, as it did before, a batch ran on for up to 15 steps
  past its last stop token, and each read left the GPU idle until the host launched again.)

The same code runs eagerly on CPU (no graphs), which is how it is tested against `generate`.
Greedy decoding only: it is the paper's evaluation setting; anything else is refused.
"""

from __future__ import annotations

import gc
import logging
import math
from collections import deque
from dataclasses import dataclass

from egm.infer.fast.kernels import LIBRARY, DecodeOps
from egm.infer.fast.prefill import PrefillPlan, Prefiller, causal_padding_bias, rotate_half

log = logging.getLogger(__name__)


def step_inputs(token, position, embed_w, inv_freq, scaling: float):
    """A decode step's inputs: the new tokens' embeddings [B, 1, H] and their rope cos and sin [B, hd]
    (text tokens have equal T/H/W positions, so Qwen3-VL's interleaved 3D rope is plain rope here)."""
    import torch
    import torch.nn.functional as F

    freqs = position.view(-1, 1).float() * inv_freq  # [B, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    x = F.embedding(token, embed_w).unsqueeze(1)
    return x, (emb.cos() * scaling).to(embed_w.dtype), (emb.sin() * scaling).to(embed_w.dtype)


def attn_in(x, norm_w, qkv_w, eps: float, ops: DecodeOps = LIBRARY):
    """Pre-attention block of one layer for one new token: norm and fused QKV product, [B, 1, (nh + 2 kvh) hd].
    The per-head norms, rope and the cache write are the attention's (`DecodeOps.attention`)."""
    return ops.norm_linear(x, norm_w, eps, qkv_w)


def mlp_out(x, attn, o_w, norm_w, gate_up_w, down_w, eps: float, ops: DecodeOps = LIBRARY):
    """Post-attention block of one layer: output projection, residual, norm, SwiGLU MLP, residual."""
    x = ops.add_linear(x, attn, o_w)
    return ops.add_linear(x, ops.norm_swiglu_linear(x, norm_w, eps, gate_up_w), down_w)


@dataclass
class _Layer:
    norm_w: object
    qkv_w: object
    q_norm_w: object
    k_norm_w: object
    o_w: object
    post_norm_w: object
    gate_up_w: object
    down_w: object


def _fuse_linears(linears):
    """One weight for several linears applied to the same input; the modules keep views into it.

    The originals are released, so fusing costs no memory and the model's own forward (used for
    prefill) still sees the same weights.
    """
    import torch

    for lin in linears:
        if lin.bias is not None:
            raise NotImplementedError("fused decode assumes bias-free projections (as in Qwen3-VL)")
    fused = torch.cat([lin.weight.data for lin in linears], dim=0)
    offset = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = fused[offset : offset + n]
        offset += n
    return fused


class _State:
    """Static buffers for one (batch, cache length) shape, and its captured graph."""

    def __init__(self, batch: int, length: int, n_layers: int, kvh: int, hd: int, dtype, device, lookahead: int):
        import torch

        self.batch, self.length = batch, length
        zeros = dict(dtype=dtype, device=device)
        # Zero-filled, never uninitialised: masked positions still enter attention's V product.
        self.kv = [torch.zeros(2, batch, kvh, length, hd, **zeros) for _ in range(n_layers)]
        longs = dict(dtype=torch.long, device=device)
        # Additive attention mask (0 where a position may be attended, -inf elsewhere), in the
        # model's dtype: the attention kernel takes it as is, with no per-layer conversion.
        self.bias = torch.full((batch, 1, 1, length), float("-inf"), **zeros)
        self.token = torch.zeros(batch, **longs)
        self.position = torch.zeros(batch, **longs)
        self.first = torch.zeros(batch, **longs)  # each row's first unmasked position (after its left padding)
        self.counts = torch.zeros(batch * kvh, dtype=torch.int32, device=device)  # the attention kernel's, left zero
        self.write_at = torch.zeros(1, **longs)
        self.step = torch.zeros(1, **longs)
        self.out = torch.zeros(batch, length, **longs)  # never more new tokens than cache positions
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        # On CUDA, `lookahead` slots for pinned host copies of `done`, each with the event recorded
        # after its copy (GraphDecoder._stopped).
        on_cuda = torch.device(device).type == "cuda"
        self.flags = torch.zeros(lookahead, batch, dtype=torch.bool, pin_memory=True) if on_cuda else None
        self.events = [torch.cuda.Event() for _ in range(lookahead)] if on_cuda else []
        self.logits = None  # kept only when the decoder is asked to (checks)
        self.graph = None
        self.prefills: dict[tuple, _PrefillGraph] = {}  # captured prompt passes, by plan key
        self.seen: dict[tuple, int] = {}  # prompt-pass shapes run eagerly so far


@dataclass
class _PrefillGraph:
    """A captured prompt pass: its input buffers, its output and the plan whose tables it reads."""

    graph: object
    buffers: dict
    first: object
    plan: PrefillPlan  # keeps the vision tables the graph reads alive


class GraphDecoder:
    """Greedy generation for a `Qwen3VLForConditionalGeneration` (any size) with a static cache.

    `generate_ids(inputs, max_new_tokens, eos_ids)` takes the processor's tensors (input_ids
    left-padded, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw) and returns
    [B, n] new token ids (rows continue past their eos; cut them there).
    """

    # Cache lengths are rounded up to this: aligned rows keep the attention kernel on its fast path.
    ALIGN = 64

    def __init__(self, model, use_graphs: bool | None = None, compile_layers: bool = False, lookahead: int = 2,
                 use_kernels: bool | None = None):
        import torch

        from egm.infer.fast import kernels

        self.model = model
        self.torch = torch
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        # The host reads a step's stop flags once lookahead - 1 more steps are launched (module
        # docstring); 1 waits for each step as soon as it is launched, leaving the GPU idle between steps.
        self.lookahead = max(1, int(lookahead))
        self.steps_run = 0  # decode steps the last generate_ids ran, its first token's prompt pass included
        self._marks: list = []  # the last generate_ids' CUDA events (device_ms)
        # Steps through egm.infer.fast.kernels (benchmarks/decode_kernels.py): single-row products
        # with their norm, activation and residual folded in, and the attention at every batch;
        # without them (and for products of several rows) through the library's.
        if use_kernels is None:
            use_kernels = self.device.type == "cuda" and kernels.available()
        if use_kernels:
            kernels.register()
        self.ops = kernels.KERNELS if use_kernels else kernels.LIBRARY

        text = model.model.language_model
        cfg = text.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"fused decode assumes a SiLU MLP, got {cfg.hidden_act}")
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.hd**-0.5
        self.embed_w = text.embed_tokens.weight
        self.final_norm_w = text.norm.weight
        self.lm_head_w = model.lm_head.weight
        rotary = text.rotary_emb
        # Text tokens have equal T/H/W positions, so Qwen3-VL's interleaved 3D rope reduces to plain
        # rope on the text position: no mrope recomposition needed in decode.
        self.inv_freq = rotary.inv_freq.detach().to(self.device, torch.float32)
        self.rotary = rotary  # the prompt's 3D (interleaved) rope tables come from the model's own module
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.layers: list[_Layer] = []
        for layer in text.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    norm_w=layer.input_layernorm.weight,
                    qkv_w=_fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]),
                    q_norm_w=attn.q_norm.weight,
                    k_norm_w=attn.k_norm.weight,
                    o_w=attn.o_proj.weight,
                    post_norm_w=layer.post_attention_layernorm.weight,
                    gate_up_w=_fuse_linears([mlp.gate_proj, mlp.up_proj]),
                    down_w=mlp.down_proj.weight,
                )
            )
        self.prefiller = Prefiller(model, self.device, self.dtype)
        self._states: dict[tuple[int, int], _State] = {}
        self._eos = None  # generate_ids sets the stop ids; a warm-up step stops on none
        self.keep_logits = False  # checks: keep the logits of the last decode step
        self.set_compile(compile_layers)

    def set_compile(self, compile_layers: bool) -> None:
        """Compile (or not) the per-layer blocks; captured graphs are dropped and made anew."""
        self._step_inputs, self._attn_in, self._mlp_out = step_inputs, attn_in, mlp_out
        if compile_layers:
            # Each batch size compiles once (the blocks' inputs do not depend on the cache length).
            dynamo = self.torch._dynamo.config
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo, knob):
                    setattr(dynamo, knob, max(getattr(dynamo, knob), 256))
            # One compiled graph serves every layer: weights are arguments, not constants.
            self._step_inputs = self.torch.compile(step_inputs, dynamic=False, fullgraph=True)
            self._attn_in = self.torch.compile(attn_in, dynamic=False, fullgraph=True)
            self._mlp_out = self.torch.compile(mlp_out, dynamic=False, fullgraph=True)
        self.compile_layers = bool(compile_layers)
        self._states.clear()

    def warm_up(self, batch: int) -> None:
        """Compile and capture the decode step for `batch` rows now (the compiled blocks depend on
        the batch alone), so that cost lands in loading, as vLLM's compilation and capture do,
        not in the first request's answer."""
        s = self._state(int(batch), self.ALIGN)  # on CUDA: steps run and a graph captured
        if s.graph is None:
            with self.torch.inference_mode():
                self._step(s)

    # ---- one decode step (captured as a graph on CUDA) ----

    def _step(self, s: _State) -> None:
        b = s.batch
        x, cos, sin = self._step_inputs(s.token, s.position, self.embed_w, self.inv_freq, self.rope_scaling)
        s.bias.index_fill_(3, s.write_at, 0.0)
        ops = self.ops
        for i, w in enumerate(self.layers):
            qkv = self._attn_in(x, w.norm_w, w.qkv_w, self.eps, ops).view(b, -1)
            o = ops.attention(qkv, w.q_norm_w, w.k_norm_w, cos, sin, self.eps, s.kv[i], s.bias, self.scale, s.write_at,
                              s.first, s.counts)
            x = self._mlp_out(x, o.reshape(b, 1, self.nh * self.hd), w.o_w, w.post_norm_w, w.gate_up_w, w.down_w,
                              self.eps, ops)
        logits = ops.norm_linear(x.view(b, self.hidden), self.final_norm_w, self.eps, self.lm_head_w)
        if s.logits is not None:
            s.logits.copy_(logits)
        ops.advance(logits.argmax(dim=-1), s.out, s.step, s.done, self._eos, s.token, s.position, s.write_at)

    def _state(self, batch: int, length: int) -> _State:
        torch = self.torch
        key = (batch, length)
        if key in self._states:
            return self._states[key]
        # One shape at a time: a real run walks through buckets, and each holds a whole KV cache.
        self._states.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        s = _State(batch, length, len(self.layers), self.kvh, self.hd, self.dtype, self.device, self.lookahead)
        if self.keep_logits:
            s.logits = torch.zeros(batch, self.lm_head_w.shape[0], dtype=self.dtype, device=self.device)
        if self.use_graphs:
            # Compiled and captured with autograd off, as every step runs: egm.infer.fast.kernels'
            # custom ops have no backward, and a graph traced for autograd would want one.
            with torch.inference_mode():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: compiles, cuBLAS handles, allocator pools
                        s.write_at.zero_()
                        s.step.zero_()
                        self._step(s)
                torch.cuda.current_stream().wait_stream(stream)
                s.write_at.zero_()
                s.step.zero_()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step(s)
            s.graph = graph
            # Compilation leaves a large heap of long-lived objects; frozen, the garbage collector
            # stops rescanning them, which otherwise lands as pauses in the middle of a request.
            # Collected first: garbage frozen along with them would never be freed.
            gc.collect()
            gc.freeze()
        self._states[key] = s
        return s

    # ---- generation ----

    # Prompt passes with more tokens than this are not captured: the GPU is then busy enough
    # that launches hide behind kernels, and a captured pass keeps its activations' memory.
    PREFILL_GRAPH_TOKENS = 8192
    PREFILL_GRAPHS_KEPT = 8

    def cache_state(self, batch: int, cache_length: int) -> _State:
        """The static cache (and captured decode step) for `batch` rows of `cache_length` positions."""
        return self._state(int(batch), math.ceil(int(cache_length) / self.ALIGN) * self.ALIGN)

    def prefill(self, inputs: dict, state: _State | None = None):
        """Run the prompt through the model; returns (first new token [B], rope deltas [B]).

        The prompt's keys/values go into `state`'s static cache (when given). With a state on
        CUDA, a prompt-pass shape seen once before is captured as a graph and replayed.
        """
        torch = self.torch
        plan = self.prefiller.plan(inputs)
        device_inputs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"].to(self.dtype),
        }
        # Inference mode here too, not only in generate_ids: called on its own (the latency
        # benchmark times it), an autograd-recording prompt pass at batch 64 filled the H200.
        with torch.inference_mode():
            deltas = plan.deltas.to(self.device)
            captured = self._prefill_graph(state, plan, device_inputs) if state is not None else None
            if captured is None:
                first = self.run_prefill(plan, **device_inputs, position_ids=plan.position_ids.to(self.device),
                                         image_index=plan.image_index.to(self.device),
                                         kv=state.kv if state is not None else None)
                return first, deltas
            buffers = captured.buffers
            for name, value in device_inputs.items():
                buffers[name].copy_(value)
            buffers["position_ids"].copy_(plan.position_ids)
            buffers["image_index"].copy_(plan.image_index)
            captured.graph.replay()
            return captured.first.clone(), deltas

    def _prefill_graph(self, s: _State, plan: PrefillPlan, device_inputs: dict) -> _PrefillGraph | None:
        """The captured prompt pass for this plan's shapes, captured now if it was seen before."""
        torch = self.torch
        key = plan.key
        if key in s.prefills:
            s.prefills[key] = s.prefills.pop(key)  # most recently used last: the first is evicted
            return s.prefills[key]
        batch, length = key[0], key[1]
        if not self.use_graphs or batch * length > self.PREFILL_GRAPH_TOKENS:
            return None
        s.seen[key] = s.seen.get(key, 0) + 1
        if s.seen[key] < 2:  # shapes that never recur are not worth a capture
            return None
        if len(s.prefills) >= self.PREFILL_GRAPHS_KEPT:
            s.prefills.pop(next(iter(s.prefills)))
        buffers = {name: value.clone() for name, value in device_inputs.items()}
        buffers["position_ids"] = plan.position_ids.to(self.device)
        buffers["image_index"] = plan.image_index.to(self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: library handles and allocator pools
            self.run_prefill(plan, **buffers, kv=s.kv)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            first = self.run_prefill(plan, **buffers, kv=s.kv)
        s.prefills[key] = _PrefillGraph(graph, buffers, first, plan)
        return s.prefills[key]

    def run_prefill(self, plan: PrefillPlan, input_ids, attention_mask, pixel_values, position_ids, image_index,
                    kv=None):
        """The prompt pass as device work of fixed shapes (a graph can hold it): the first greedy
        token [B]; the prompt's keys/values go into `kv` (the static cache's layers) when given."""
        import torch.nn.functional as F

        image, deepstack = self.prefiller.vision(plan, pixel_values)
        x = F.embedding(input_ids, self.embed_w)
        b, length, hidden = x.shape
        flat = x.view(-1, hidden)
        flat.index_copy_(0, image_index, image.to(x.dtype))
        cos, sin = self.rotary(x, position_ids)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, L, 1, hd]: the same for every head
        bias = causal_padding_bias(attention_mask, x.dtype)
        nh, kvh, hd = self.nh, self.kvh, self.hd
        group = nh // kvh  # query heads per key/value head
        for i, w in enumerate(self.layers):
            q, k, v = LIBRARY.norm_linear(x, w.norm_w, self.eps, w.qkv_w).split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q = F.rms_norm(q.view(b, length, nh, hd), (hd,), w.q_norm_w, self.eps)
            k = F.rms_norm(k.view(b, length, kvh, hd), (hd,), w.k_norm_w, self.eps)
            q = (q * cos + rotate_half(q) * sin).transpose(1, 2)
            k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
            v = v.view(b, length, kvh, hd).transpose(1, 2)
            if kv is not None:
                kv[i][0, :, :, :length].copy_(k)
                kv[i][1, :, :, :length].copy_(v)
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                               attn_mask=bias, scale=self.scale)
            x = mlp_out(x, o.transpose(1, 2).reshape(b, length, nh * hd), w.o_w, w.post_norm_w, w.gate_up_w,
                        w.down_w, self.eps)
            if i < len(deepstack):  # DeepStack: vision features of early blocks join early layers
                flat = x.view(-1, hidden)
                flat.index_copy_(0, image_index, flat.index_select(0, image_index) + deepstack[i].to(x.dtype))
        return LIBRARY.norm_linear(x[:, -1], self.final_norm_w, self.eps, self.lm_head_w).argmax(dim=-1)

    def check_step(self, inputs: dict, cache_length: int | None = None, eager_reference: bool = True) -> dict:
        """Logits of the first decode step, this decoder against the model's own `generate`.

        Returns the relative error ||ours - theirs|| / ||theirs|| and the share of rows whose
        argmax agrees (both continue from their own prefill of the same inputs).
        """
        from transformers import GenerationConfig

        torch = self.torch
        self.keep_logits = True
        self._states.clear()
        try:
            ids = self.generate_ids(inputs, 2, None, cache_length)
            ours = next(iter(self._states.values())).logits.float().clone()
            config = GenerationConfig(max_new_tokens=2, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
            with torch.inference_mode():
                out = self.model.generate(**inputs, generation_config=config)
            theirs = out.logits[1].float()
            reference_tokens = out.sequences[:, -2]
            del out  # generate's output holds its cache in reference cycles: free it now
            gc.collect()
            result = {
                "rel_error": float((ours - theirs).norm() / theirs.norm()),
                "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
                "first_token_agreement": float((ids[:, 0].to(self.device) == reference_tokens).float().mean()),
            }
            # The same model's own spread: its eager attention against its default one. Low
            # precision makes both differ from the exact logits; ours should differ no more.
            if not eager_reference:
                return result
            previous = self.model.config._attn_implementation
            try:
                self.model.set_attn_implementation("eager")
                with torch.inference_mode():
                    eager = self.model.generate(**inputs, generation_config=config).logits[1].float()
                result["model_eager_vs_default_rel_error"] = float((eager - theirs).norm() / theirs.norm())
            except Exception as err:  # a check of the check: never fatal
                result["model_eager_vs_default_rel_error"] = f"{type(err).__name__}: {err}"[:200]
            finally:
                self.model.set_attn_implementation(previous)
                gc.collect()
            return result
        finally:
            self.keep_logits = False
            self._states.clear()

    def generate_ids(self, inputs: dict, max_new_tokens: int, eos_ids: list[int] | None = None, cache_length: int | None = None):
        """[B, n] greedy new tokens, n <= max_new_tokens (fewer when every row has hit an eos).

        `cache_length` fixes the static cache's length (>= prompt + max_new_tokens), so runs with
        different prompt lengths or token budgets can share one captured graph.
        """
        torch = self.torch
        ids = inputs["input_ids"]
        batch, prompt = ids.shape
        max_new_tokens = int(max_new_tokens)
        length = cache_length or prompt + max_new_tokens
        if length < prompt + max_new_tokens:
            raise ValueError(f"cache length {length} < prompt {prompt} + {max_new_tokens} new tokens")
        length = math.ceil(length / self.ALIGN) * self.ALIGN
        # A captured step reads the stop ids at the address they had when it was captured: the
        # tensor is made anew only with a new stop set, and the graphs go with the old one. (Made
        # per call, the captured step read freed memory that later allocations reused: on the
        # H200 whole batches stopped after 33 or 49 tokens.)
        eos_key = tuple(sorted(set(eos_ids))) if eos_ids else None
        if getattr(self, "_eos_key", "unset") != eos_key:
            self._states.clear()
            self._eos_key = eos_key
            self._eos = torch.tensor(eos_key, device=self.device) if eos_key else None
        s = self._state(batch, length)

        # Events around the prompt pass and the steps (CUDA): their GPU time, read afterwards
        # (`device_ms`) without a sync of their own.
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.device.type == "cuda" else []
        with torch.inference_mode():
            if marks:
                marks[0].record()
            first, deltas = self.prefill(inputs, s)
            mask = inputs["attention_mask"].to(torch.bool)
            s.bias.fill_(float("-inf"))
            s.bias[:, 0, 0, :prompt].masked_fill_(mask, 0.0)
            s.first.copy_((mask.cumsum(dim=-1) == 0).sum(dim=-1))
            s.token.copy_(first)
            # The next text position: one past the prompt's largest (3D) position.
            s.position.copy_(mask.sum(dim=-1) + deltas.to(self.device))
            s.write_at.fill_(prompt)
            s.out.zero_()
            s.out[:, 0].copy_(first)
            s.step.fill_(1)
            if self._eos is not None:
                s.done.copy_(torch.isin(first, self._eos))
            else:
                s.done.zero_()
            if marks:
                marks[1].record()
            steps, pending = 1, deque()
            while steps < max_new_tokens:
                if s.graph is not None:
                    s.graph.replay()
                else:
                    self._step(s)
                steps += 1
                if self._eos is not None and self._stopped(s, steps, pending):
                    break
            if marks:
                marks[2].record()
            self.steps_run, self._marks = steps, marks
            return s.out[:, :steps].clone()

    def device_ms(self) -> dict:
        """The last `generate_ids`' GPU time in ms (CUDA; else empty), once its tokens are on the host:
        `prefill` from the prompt pass's start to the first step's, `steps` the decode steps."""
        marks = self._marks
        if not marks:
            return {}
        return {"prefill": marks[0].elapsed_time(marks[1]), "steps": marks[1].elapsed_time(marks[2])}

    def _stopped(self, s: _State, steps: int, pending: deque) -> bool:
        """Whether every row had stopped as of the step launched `lookahead - 1` launches before
        step `steps` (on the CPU, where the state has no slots and the host runs nothing ahead: as
        of step `steps`). Behind the step just launched, its stop flags are copied to the host into
        one of the state's `lookahead` pinned slots, which waits in `pending` until it is read."""
        if s.flags is None:
            return bool(s.done.all())
        # The slots in use hold the last lookahead - 1 steps, none of them this step's modulo lookahead.
        slot = steps % self.lookahead
        s.flags[slot].copy_(s.done, non_blocking=True)
        s.events[slot].record()
        pending.append(slot)
        if len(pending) < self.lookahead:
            return False
        slot = pending.popleft()
        s.events[slot].synchronize()
        return bool(s.flags[slot].all())

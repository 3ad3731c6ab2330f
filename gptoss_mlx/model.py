"""gpt-oss in MLX, following OpenAI's reference (``gpt_oss/torch/model.py`` in github.com/openai/gpt-oss).

    x = embed_tokens[tokens]
    for each block:  x = x + attention(rmsnorm(x));  x = x + moe(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

Module names follow the Hugging Face checkpoint (self_attn.sinks, mlp.router, ...), so its
tensors load with few renames; q_proj, k_proj and v_proj are loaded into one qkv_proj, as in
the reference (one matmul and one RoPE instead of three and two, per layer and token). The
experts stay packed in MXFP4 and run through MLX's ``gather_qmm`` (or, for decode-sized
batches, the fused kernels); they are never dequantized.

The plain-MLX operations (clamped SwiGLU, top-k routing, the experts' gather, the attention
mask) are in ``ops``; each custom kernel is one call into ``kernels`` that runs the kernel where
it applies and the ``ops`` form otherwise.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import kernels, ops
from .cache import (GroupedStep, KindStep, KVCache, RotatingKVCache, device_positions, end_grouped_step,
                    grouped_step, step_kinds)
from .config import ModelConfig, yarn_correction_range


class RMSNorm(nn.Module):
    """RMSNorm with a plain gain (no 1 + w, no bias). MLX's kernel accumulates and scales in
    float32 and rounds once at the end, as the reference's float32 norm does; the published
    gains are bf16 values, so holding them in bf16 loses nothing."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def yarn_parameters(config: ModelConfig) -> tuple[list[float], float]:
    """YaRN inverse frequencies (head_dim/2 values) and the concentration.

    Computed in float64 exactly as the reference's ``RotaryEmbedding._compute_concentration_and_inv_freq``.
    """
    d = config.head_dim
    base = config.rope_theta
    freqs = [base ** (2 * i / d) for i in range(d // 2)]
    factor = config.rope_scaling_factor
    if factor <= 1.0:
        return [1.0 / f for f in freqs], 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    low, high = yarn_correction_range(config)  # unrounded unless truncate
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    inv_freq = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        mask = 1.0 - ramp  # 1: keep the original frequency (extrapolate), 0: interpolate
        inv_freq.append((1.0 / (factor * f)) * (1.0 - mask) + (1.0 / f) * mask)
    return inv_freq, concentration


class YarnRoPE(nn.Module):
    """Half-split (NeoX) RoPE with YaRN frequencies.

    The YaRN concentration multiplies both cos and sin, so it scales every q.k by
    concentration**2; the attention folds that into its softmax scale instead of scaling here.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.concentration = yarn_parameters(config)
        self.dims = config.head_dim
        self._periods = mx.array([1.0 / f for f in inv_freq], dtype=mx.float32)

    @property
    def periods(self) -> mx.array:
        """(head_dim / 2,) float32: theta = position / period (mx.fast.rope's ``freqs``)."""
        return self._periods

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if isinstance(offset, int):  # not a scalar the host makes per call (cache.device_positions)
            offset = device_positions(offset)
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
            freqs=self._periods,
        )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, sliding: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window if sliding else None
        d_model, d = config.hidden_size, config.head_dim
        # rows: the query heads, then the KV heads' keys, then their values
        self.qkv_proj = nn.Linear(d_model, (self.num_heads + 2 * self.num_kv_heads) * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, d_model, bias=True)
        self.sinks = mx.zeros((self.num_heads,))  # one learned logit per query head
        self.rope = YarnRoPE(config)
        self.scale = self.rope.concentration**2 / math.sqrt(d)
        self.group = None  # tensor parallel: this rank's heads; the ranks' outputs are summed

    def __call__(self, x: mx.array, cache=None, norm: RMSNorm | None = None) -> mx.array:
        """Attention over ``norm(x)`` (the block's input norm; None: over x as it is)."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        H, KV = self.num_heads, self.num_kv_heads
        # qkv_proj(norm(x)) as queries (B, H, L, head_dim) and keys then values (B, 2 KV, L,
        # head_dim), RoPE on the queries and keys (they share their positions): one kernel at
        # decode, and the keys and values go into the cache with one write. Query head h reads
        # KV head h // (H / KV).
        q, kv = kernels.qkv_rope(x, norm, self.qkv_proj, self.rope, offset, H, KV)
        # Sinks: an extra softmax column per head that takes weight but adds no value.
        # (Loaded models hold them in the activation dtype already: no cast per token.)
        sinks = self.sinks if self.sinks.dtype == q.dtype else self.sinks.astype(q.dtype)
        # softmax([q.k * scale over the keys inside the window, sink]) . v  -> (B, L, H, head_dim)
        if isinstance(cache, GroupedStep):
            # The engine's decode step: the cache as it was before the token, the token's key and
            # value from kv, written later with the other layers' (cache.py, grouped decode steps).
            out = kernels.attention_step(q, kv, sinks, self.scale, cache)
        else:
            k, v = cache.update_and_fetch_kv(kv) if cache is not None else (kv[:, :KV], kv[:, KV:])
            # (B, 1, 1, K): a decode batch's rows of unequal lengths, the compiled step's filled slots
            mask = getattr(cache, "mask", None)
            if mask is None:
                out = kernels.attention(q, k, v, sinks, self.scale, self.window, offset, cache)
            else:
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask, sinks=sinks)
                out = out.transpose(0, 2, 1, 3)
        out = kernels.linear(out.reshape(B, L, -1), self.o_proj)
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)


class SwitchLinear(nn.Module):
    """``num_experts`` quantized linears [out, in] applied to each token's chosen experts.

    MXFP4 (the checkpoints): weight uint32 [E, out, in/8], scales uint8 [E, out, in/32].
    An mlx-lm affine conversion also has ``biases`` (the quantization zero points).
    ``bias`` [E, out] is the layer's own additive bias.
    """

    def __init__(self, in_dims: int, out_dims: int, num_experts: int,
                 mode: str = "mxfp4", group_size: int = 32, bits: int = 4):
        super().__init__()
        self.mode, self.group_size, self.bits = mode, group_size, bits
        per_word = 32 // bits
        self.weight = mx.zeros((num_experts, out_dims, in_dims // per_word), dtype=mx.uint32)
        self.scales = mx.zeros((num_experts, out_dims, in_dims // group_size), dtype=mx.uint8)
        if mode == "affine":
            self.scales = self.scales.astype(mx.float16)
            self.biases = mx.zeros_like(self.scales)
        self.bias = mx.zeros((num_experts, out_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return ops.gather_linear(x, self.weight, self.scales, self.bias, indices, biases=self.get("biases"),
                                 mode=self.mode, group_size=self.group_size, bits=self.bits,
                                 sorted_indices=sorted_indices)


SORTED_GATHER_ROWS = 64  # from this many (token, expert) rows the experts' gather sorts them


class Experts(nn.Module):
    def __init__(self, config: ModelConfig, mode="mxfp4", group_size=32, bits=4):
        super().__init__()
        D, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.swiglu_limit = config.swiglu_limit
        # gate_up_proj rows are interleaved: even rows are the gate, odd rows the linear part.
        self.gate_up_proj = SwitchLinear(D, 2 * I, E, mode, group_size, bits)
        self.down_proj = SwitchLinear(I, D, E, mode, group_size, bits)

    def resident(self, indices: mx.array, x: mx.array, residual: mx.array) -> tuple[mx.array, "Experts"]:
        """(indices into the Experts that hold them, those Experts) for the MoE's input ``x``
        (T, D): here, the layer's own. A streamed layer's experts live in slots of a shared pool
        instead, and ``residual`` lets it guess the next layer's (expert_pool.py)."""
        return indices, self

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (T, D), indices (T, k) -> each chosen expert's output (T, k, D)."""
        x = mx.expand_dims(x, (-2, -3))  # (T, 1, 1, D)
        # Many tokens: group rows by expert so each expert's weights are read once.
        do_sort = indices.size >= SORTED_GATHER_ROWS
        if do_sort:
            order = mx.argsort(indices.flatten())
            inverse = mx.argsort(order)
            x = x.flatten(0, -3)[order // indices.shape[-1]]  # (T*k, 1, D)
            idx = indices.flatten()[order]
        else:
            idx = indices
        h = self.gate_up_proj(x, idx, sorted_indices=do_sort)  # (..., 1, 2I)
        h = ops.swiglu(h[..., ::2], h[..., 1::2], self.swiglu_limit)
        y = self.down_proj(h, idx, sorted_indices=do_sort)  # (..., 1, D)
        if do_sort:
            y = y[inverse].reshape(*indices.shape, 1, -1)
        return y.squeeze(-2)


class MLP(nn.Module):
    """The mixture of experts: route each token to its top-k experts, then mix their outputs."""

    def __init__(self, config: ModelConfig, **expert_quantization):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = Experts(config, **expert_quantization)
        self.group = None  # expert parallel: this rank holds experts first_expert, first_expert + 1, ...
        self.first_expert = 0

    def __call__(self, x: mx.array, residual: mx.array, routing=None) -> mx.array:
        """residual + moe(x): the block's residual add is fused into the experts' last step.
        ``routing``: x's (indices, weights) when the caller has routed it already, else None."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        residual = residual.reshape(x.shape)
        # top-k first, then softmax over the k chosen logits only (not over all experts).
        indices, weights = routing or kernels.route(x, self.router, self.top_k)  # (T, k) each, highest first
        if self.group is not None:  # only this rank's experts, and the residual on one rank
            indices, weights = self.local_choices(indices, weights)
            residual = residual if self.group.rank() == 0 else mx.zeros_like(residual)
        indices, experts = self.experts.resident(indices, x, residual)
        # residual + sum_j weights_j * experts(x)_j
        out = kernels.experts(x, indices, weights, experts, residual)
        if self.group is not None:
            out = mx.distributed.all_sum(out, group=self.group)
        return out.reshape(shape)

    def local_choices(self, indices: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
        """The chosen experts renumbered to this rank's; a choice held by another rank gets weight
        0 and points at one of the token's local choices (expert 0 if none), so that it reads
        no weights that are not read anyway."""
        local = indices.astype(mx.int32) - self.first_expert
        mine = (local >= 0) & (local < self.experts.down_proj.weight.shape[0])
        fallback = mx.max(mx.where(mine, local, 0), axis=-1, keepdims=True)
        return mx.where(mine, local, fallback).astype(indices.dtype), mx.where(mine, weights, 0)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, sliding: bool, **expert_quantization):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, sliding)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, **expert_quantization)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        # attention(rmsnorm(x)) (the norm inside the attention's first kernel at decode), then
        # h = x + attention, its norm and the MoE's routing, in one kernel where it is active.
        attended = self.self_attn(x, cache, norm=self.input_layernorm)
        norm = self.post_attention_layernorm
        h, normed, routing = kernels.add_rms_norm_route(x, attended, norm.weight, norm.eps, self.mlp.router,
                                                        self.mlp.top_k)
        return self.mlp(normed, residual=h, routing=routing)  # h + moe(normed)


def token_ids(inputs, vocab: int | None) -> mx.array:
    """``inputs`` (an mx.array, or a list or numpy array) as the (B, L) integer ids the embedding
    takes, or the error naming what is wrong with them (see Model.__call__); their range is not
    checked when ``vocab`` is None."""
    if not isinstance(inputs, mx.array):
        try:
            inputs = mx.array(inputs)
        except (ValueError, TypeError):  # ragged lists, objects
            raise ValueError("token ids must be a (batch, length) array of integers") from None
        except RuntimeError:  # MLX's std::bad_cast: an int beyond 64 bits
            raise ValueError("token ids must be integers within the model's vocabulary, got one "
                             "beyond 64 bits") from None
    if inputs.ndim != 2 or inputs.size == 0:
        raise ValueError(f"token ids must be a (batch, length) array with at least one id, got shape "
                         f"{tuple(inputs.shape)} (one sequence: mx.array([tokens]))")
    if not mx.issubdtype(inputs.dtype, mx.integer):
        raise TypeError(f"token ids must be integers, got {inputs.dtype}")
    if vocab is not None:
        low, high = mx.min(inputs).item(), mx.max(inputs).item()
        if low < 0 or high >= vocab:
            raise ValueError(f"token id {low if low < 0 else high} is outside the model's vocabulary "
                             f"of {vocab} ids (0 to {vocab - 1})")
    return inputs


def _described(cache) -> str:
    if not isinstance(cache, (list, tuple)):
        return f"{type(cache).__name__} {cache!r:.60}"
    kinds = sorted({type(c).__name__ for c in cache})
    return f"{len(cache)} entries of type {', '.join(kinds) or '-'}"


def _rows_held(cache) -> int | None:
    """The batch rows a layer's cache holds keys for (None: empty, or no cache)."""
    kv, offset = getattr(cache, "kv", None), getattr(cache, "offset", None)
    return kv.shape[0] if isinstance(kv, mx.array) and isinstance(offset, int) and offset > 0 else None


class Model(nn.Module):
    def __init__(self, config: ModelConfig, **expert_quantization):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [
            TransformerBlock(config, sliding, **expert_quantization)
            for sliding in config.sliding_layers
        ]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.expert_pool = None  # an ExpertPool when the experts are streamed (loading.py)
        # Pipeline parallel (shard): this rank's stage; then embed_tokens is None on all ranks but
        # the first stage, lm_head None on all but rank 0 (the last stage), as on tensor followers.
        self.sharding = None  # after shard: tensor or pipeline
        self.planned_context: int | None = None  # load(): the context its memory was planned for
        self.stage = None

    def __call__(self, inputs: mx.array, cache: list | None = None, *,
                 evaluate_layers: bool = False, sampled: bool = False) -> mx.array:
        """inputs (B, L) token ids -> logits (B, L, vocab). With a cache, positions continue
        from ``cache[0].offset`` and the cache is updated in place. A decode batch (L = 1) passes
        batch caches (``cache.merge_caches``): each row continues from its own position.

        ``evaluate_layers`` evaluates each layer's output as soon as it is built (long prefill
        chunks, not inside mx.compile): evaluated as one graph, every layer's temporaries stay
        allocated until the last layer finishes — at 2048 tokens that doubled the 20b model's
        peak memory (28.4 GB vs 15.5 GB, docs/measurements.md).

        Wrong inputs are a ValueError or TypeError naming them: ids that are not (B, L) integers,
        a cache that is not one per layer, ids outside the vocabulary (the embedding would read
        past its end). ``sampled``: the ids were sampled from this model's logits (the engine's
        decode steps), so in range: not checked, which would wait for them to be computed (nor
        are the cache's entries, the engine's own, on that per-token path)."""
        if self.expert_pool is not None:
            # Streamed experts live in slots every pass shares, whichever thread runs it: one
            # pass at a time, finished on the device before the next may rewrite them (passes
            # from several threads interleaved and gave other logits, silently).
            with self.expert_pool.one_pass:
                self.expert_pool.begin_pass(may_wait=not evaluate_layers)
                logits = self._forward(inputs, cache, evaluate_layers, sampled)
                self.expert_pool.evaluate(logits)
                return logits
        return self._forward(inputs, cache, evaluate_layers, sampled)

    def _forward(self, inputs: mx.array, cache: list | None, evaluate_layers: bool, sampled: bool) -> mx.array:
        if cache is None:
            cache = [None] * len(self.layers)
        elif not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers) or (
                not sampled and not all(hasattr(c, "update_and_fetch") for c in cache)):  # (sampled: the engine's own)
            raise ValueError(f"the cache must be the model's own, one per layer ({len(self.layers)}), "
                             f"got {_described(cache)}: make it with model.make_cache()")
        if self.embed_tokens is not None:
            inputs = token_ids(inputs, None if sampled else self.config.vocab_size)
            held = None if sampled else _rows_held(cache[0])
            if held is not None and held != inputs.shape[0]:
                raise ValueError(f"the cache holds {held} sequence(s) and the ids have {inputs.shape[0]} "
                                 "rows: a batch needs a cache of its own (model.make_cache())")
            x = self.embed_tokens(inputs)
        else:  # a later pipeline stage: the previous stage's output
            x = self.stage.receive(inputs, self.norm_dtype())
        # One token of one sequence: a grouped step where the step attention runs (cache.py).
        kinds = self.step_kinds(cache) if x.shape[:2] == (1, 1) else None
        for layer, layer_cache in zip(self.layers, cache if kinds is None else grouped_step(cache, kinds)):
            x = layer(x, layer_cache)
            if evaluate_layers:
                mx.eval(x)
            elif self.expert_pool is not None and not self.expert_pool.waiting:
                # Streamed experts read back: queued now, so that the device computes them while
                # the next layer is built (its routing read-back waits for them), and before a later
                # pass rewrites their slots; then the next layer's guessed experts start to copy.
                # (A pass whose device waits for the host is queued whole: ExpertPool.evaluate.)
                mx.async_eval(x)
                self.expert_pool.read_ahead()
        if kinds is not None:
            end_grouped_step(kinds)
        if self.lm_head is None:  # the next stage's input; a tensor-parallel follower's last state
            return x if self.stage is None else self.stage.send(x, cache)
        return self.lm_head(self.norm(x))

    def step_kinds(self, cache: list) -> list[KindStep] | None:
        """Where one sequence's decode step (compiled or not) runs the one-pass step attention
        (its kernel active for the queries' dtype, norm_dtype(), whatever the embedding's; the
        model whole): the kinds of layers whose keys and values it writes once a kind, the
        rings and, while the one pass covers their keys (kernels.step_covers), the full layers
        (cache.step_kinds); else None."""
        attn = self.layers[0].self_attn
        cached = getattr(cache[0], "offset", None)
        if (self.sharding is not None or not isinstance(cached, int)
                or not kernels.step_fits(attn.num_heads, attn.num_kv_heads, attn.head_dim, self.norm_dtype())):
            return None
        return step_kinds(cache, full=kernels.step_covers(cached))

    def norm_dtype(self) -> mx.Dtype:
        """The activations' dtype (the norms' gains are held in it)."""
        return self.layers[0].input_layernorm.weight.dtype

    def make_cache(self) -> list:
        """One cache per layer: a 128-slot ring buffer on sliding layers, a growing one on full."""
        return [
            RotatingKVCache(layer.self_attn.window) if layer.self_attn.window else KVCache()
            for layer in self.layers
        ]

    def shard(self, group, mode: str = "tensor") -> None:
        """Keep only this rank's part of the model: ``tensor`` (heads and experts split, two
        all-reduces per layer) or ``pipeline`` (a range of layers); see gptoss_mlx/distributed.py.
        Works on a loaded model, and on a built one before its weights are read (the loader)."""
        from .distributed import shard_model

        shard_model(self, group, mode)

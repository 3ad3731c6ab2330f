"""An independent float64 NumPy forward pass of gpt-oss, written from the reference description
(../shared/reference/gpt-oss.md sections 1 and 2). It shares no code with gptoss_mlx: it reads
the safetensors bytes itself, decodes MXFP4 with its own table and recomputes YaRN from scratch.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        buf = data[begin:end]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32).astype(np.float64)
        elif entry["dtype"] == "U8":
            arr = np.frombuffer(buf, dtype=np.uint8)
        elif entry["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype=np.float32).astype(np.float64)
        else:
            raise ValueError(entry["dtype"])
        out[name] = arr.reshape(entry["shape"])
    return out


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., out, in/32, 16] u8, scales [..., out, in/32] u8 -> [..., out, in] float64."""
    low = FP4_VALUES[blocks & 0x0F]  # element 2j
    high = FP4_VALUES[blocks >> 4]  # element 2j+1
    values = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = values * np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def yarn(head_dim, theta, factor, beta_fast, beta_slow, ctx):
    """inv_freq [head_dim/2] and the concentration, from the reference formula (no rounding)."""
    freq = theta ** (np.arange(0, head_dim, 2) / head_dim)
    concentration = 0.1 * math.log(factor) + 1.0
    d_half = head_dim / 2
    low = d_half * math.log(ctx / (beta_fast * 2 * math.pi)) / math.log(theta)
    high = d_half * math.log(ctx / (beta_slow * 2 * math.pi)) / math.log(theta)
    interpolation = 1.0 / (factor * freq)
    extrapolation = 1.0 / freq
    ramp = (np.arange(d_half) - low) / (high - low)
    mask = 1 - np.clip(ramp, 0, 1)
    return interpolation * (1 - mask) + extrapolation * mask, concentration


def rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def rotate(x, cos, sin):
    """Half-split RoPE: x [T, heads, d]."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class NumpyGptOss:
    def __init__(self, checkpoint: Path):
        checkpoint = Path(checkpoint)
        self.cfg = json.loads((checkpoint / "config.json").read_text())
        self.w = {}
        for f in sorted(checkpoint.glob("*.safetensors")):
            self.w.update(read_safetensors(f))

    def attention(self, i, x, window):
        c, w = self.cfg, self.w
        p = f"model.layers.{i}.self_attn."
        T = x.shape[0]
        H, KV, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        q = (x @ w[p + "q_proj.weight"].T + w[p + "q_proj.bias"]).reshape(T, H, d)
        k = (x @ w[p + "k_proj.weight"].T + w[p + "k_proj.bias"]).reshape(T, KV, d)
        v = (x @ w[p + "v_proj.weight"].T + w[p + "v_proj.bias"]).reshape(T, KV, d)
        rs = c["rope_scaling"]
        inv_freq, conc = yarn(d, c["rope_theta"], rs["factor"], rs["beta_fast"],
                              rs["beta_slow"], rs["original_max_position_embeddings"])
        angles = np.arange(T)[:, None] * inv_freq[None, :]
        cos = (np.cos(angles) * conc)[:, None, :]
        sin = (np.sin(angles) * conc)[:, None, :]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = np.zeros((T, H, d))
        sinks = w[p + "sinks"]
        for h in range(H):
            kv = h // (H // KV)  # contiguous grouping
            scores = q[:, h, :] @ k[:, kv, :].T / math.sqrt(d)  # [T, T]
            qpos, kpos = np.arange(T)[:, None], np.arange(T)[None, :]
            visible = kpos <= qpos
            if window:
                visible &= kpos > qpos - window
            scores = np.where(visible, scores, -np.inf)
            full = np.concatenate([scores, np.full((T, 1), sinks[h])], axis=1)
            full = np.exp(full - full.max(axis=1, keepdims=True))
            probs = full / full.sum(axis=1, keepdims=True)
            out[:, h, :] = probs[:, :-1] @ v[:, kv, :]
        return out.reshape(T, H * d) @ w[p + "o_proj.weight"].T + w[p + "o_proj.bias"]

    def moe(self, i, x):
        c, w = self.cfg, self.w
        p = f"model.layers.{i}.mlp."
        k = c["num_experts_per_tok"]
        logits = x @ w[p + "router.weight"].T + w[p + "router.bias"]
        w1 = dequantize_mxfp4(w[p + "experts.gate_up_proj_blocks"], w[p + "experts.gate_up_proj_scales"])
        w2 = dequantize_mxfp4(w[p + "experts.down_proj_blocks"], w[p + "experts.down_proj_scales"])
        b1, b2 = w[p + "experts.gate_up_proj_bias"], w[p + "experts.down_proj_bias"]
        limit = c["swiglu_limit"]
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            top = np.argsort(-logits[t], kind="stable")[:k]
            e = np.exp(logits[t, top] - logits[t, top].max())
            weights = e / e.sum()
            for weight, expert in zip(weights, top):
                h = w1[expert] @ x[t] + b1[expert]
                glu, lin = h[0::2], h[1::2]
                glu = np.minimum(glu, limit)
                lin = np.clip(lin, -limit, limit)
                act = glu / (1 + np.exp(-1.702 * glu)) * (lin + 1)
                out[t] += weight * (w2[expert] @ act + b2[expert])
        return out

    def __call__(self, tokens) -> np.ndarray:
        c, w = self.cfg, self.w
        eps = c["rms_norm_eps"]
        x = w["model.embed_tokens.weight"][np.asarray(tokens)]
        for i, kind in enumerate(c["layer_types"]):
            window = c["sliding_window"] if kind == "sliding_attention" else 0
            p = f"model.layers.{i}."
            x = x + self.attention(i, rmsnorm(x, w[p + "input_layernorm.weight"], eps), window)
            x = x + self.moe(i, rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps))
        return rmsnorm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T

#!/usr/bin/env python3
"""MLX's fast sdpa, RoPE and slice_update on this device against float32 CPU references, at decode
shapes: sdpa over exactly the filled keys, and over a storage through a boolean or additive mask
(unfilled slots zero or garbage), with and without sinks; RoPE with an int, a () array and per-row
offsets; slice_update at an array index. What the compiled decode step (decode_step.py) and the
server's decode batches (cache.py) rely on beyond the CPU.

    python scripts/check_masked_sdpa.py
"""
import mlx.core as mx


def reference(q, k, v, scale, mask, sinks):
    with mx.stream(mx.cpu):
        q, k, v = (a.astype(mx.float32) for a in (q, k, v))
        B, H, L, D = q.shape; KV = k.shape[1]
        k = mx.repeat(k, H // KV, axis=1); v = mx.repeat(v, H // KV, axis=1)
        s = (q * scale) @ k.swapaxes(-1, -2)  # B H L K
        if mask is not None:
            s = mx.where(mask, s, -mx.inf)
        if sinks is not None:
            s = mx.concatenate([mx.broadcast_to(sinks.astype(mx.float32).reshape(1, H, 1, 1), (B, H, L, 1)), s], axis=-1)
        p = mx.softmax(s, axis=-1)
        if sinks is not None:
            p = p[..., 1:]
        return p @ v

mx.random.seed(0)
H, KV, D, scale = 64, 8, 64, 0.125
for dtype in (mx.bfloat16, mx.float32):
    for B, K, filled in ((1, 256, [121]), (1, 128, [60]), (8, 256, [100, 121, 130, 90, 121, 5, 250, 200]), (1, 2304, [2100])):
        for garbage in (False, True):
            for use_sinks in (True, False):
                q = mx.random.normal((B, H, 1, D)).astype(dtype)
                k = mx.random.normal((B, KV, K, D)).astype(dtype)
                v = mx.random.normal((B, KV, K, D)).astype(dtype)
                fill = mx.array(filled).reshape(B, 1, 1, 1)
                slots = mx.arange(K).reshape(1, 1, K, 1)
                junk = (mx.random.normal((B, KV, K, D)) * 100).astype(dtype) if garbage else mx.zeros((B, KV, K, D), dtype)
                k = mx.where(slots < fill, k, junk); v = mx.where(slots < fill, v, junk)
                mask = (mx.arange(K).reshape(1, 1, 1, K) < fill)
                sinks = mx.random.normal((H,)).astype(dtype) if use_sinks else None
                ref = reference(q, k, v, scale, mask, sinks)
                out = {}
                out["bool mask"] = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)
                add = mx.where(mask, 0.0, -mx.inf).astype(dtype)
                out["additive mask"] = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=add, sinks=sinks)
                if B == 1:
                    n = filled[0]
                    out["exact keys"] = mx.fast.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], scale=scale, sinks=sinks)
                res = ", ".join(f"{name} {mx.abs(o.astype(mx.float32) - ref).max().item():.3g}" for name, o in out.items())
                print(f"{str(dtype):14s} B={B} K={K} garbage={garbage!s:5s} sinks={use_sinks!s:5s}: max|err| {res}", flush=True)

print("--- rope: int offset vs array offset (freqs given, as YarnRoPE), vs CPU")
freqs = mx.exp(-mx.arange(32, dtype=mx.float32) * 0.3)
for dtype in (mx.bfloat16, mx.float32):
    for B, shape_L in ((1, 1), (8, 1)):
        x = mx.random.normal((B, 72, shape_L, 64)).astype(dtype)
        for off in (0, 5, 121, 2100):
            a = mx.fast.rope(x, 64, traditional=False, base=None, scale=1.0, offset=off, freqs=freqs)
            b = mx.fast.rope(x, 64, traditional=False, base=None, scale=1.0, offset=mx.array(off, mx.int32), freqs=freqs)
            with mx.stream(mx.cpu):
                c = mx.fast.rope(x, 64, traditional=False, base=None, scale=1.0, offset=off, freqs=freqs)
            offs = mx.array([off + i for i in range(B)], mx.int32) if B > 1 else None
            d_err = ""
            if offs is not None:
                d = mx.fast.rope(x, 64, traditional=False, base=None, scale=1.0, offset=offs, freqs=freqs)
                with mx.stream(mx.cpu):
                    e = mx.fast.rope(x, 64, traditional=False, base=None, scale=1.0, offset=offs, freqs=freqs)
                d_err = f", per-row array offsets vs CPU {mx.abs(d.astype(mx.float32) - e.astype(mx.float32)).max().item():.3g}"
            print(f"{str(dtype):14s} B={B} offset {off}: int vs array {mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item():.3g}, "
                  f"int vs CPU {mx.abs(a.astype(mx.float32) - c.astype(mx.float32)).max().item():.3g}{d_err}", flush=True)

print("--- slice_update at an array index vs a slice assignment")
for dtype in (mx.bfloat16,):
    buf = mx.random.normal((1, 8, 256, 64)).astype(dtype)
    new = mx.random.normal((1, 8, 1, 64)).astype(dtype)
    for pos in (0, 121, 255):
        a = mx.slice_update(buf, new, mx.array([pos]), axes=(2,))
        b = mx.array(buf); b[:, :, pos:pos + 1] = new
        print(f"pos {pos}: equal {mx.array_equal(a, b).item()}", flush=True)

#!/usr/bin/env python3
"""Write a random gpt-oss checkpoint in the exact published layout, any size from tiny to 120b.

    python -m gptoss_mlx.testing.checkpoints OUT_DIR [--preset tiny|20b|120b] [--layers N]
        [--experts E] [--hidden D] [--vocab V] [--window W] [--original] [--mlx-dir DIR]
        [--tokenizer PATH/tokenizer.json(.gz)] [--seed S]

OUT_DIR gets config.json (with the mxfp4 quantization_config), generation_config.json and
model-XXXXX-of-XXXXX.safetensors + model.safetensors.index.json holding uint8 *_blocks/*_scales
experts and bf16 everything else, exactly as openai/gpt-oss-20b ships. ``--original`` adds the
``original/`` layout with the same weights, ``--mlx-dir`` an mlx-lm style conversion (split
gate/up experts, 8-bit affine dense layers when --mlx-dense-bits is given).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
from pathlib import Path

import mlx.core as mx

from ..config import GPT_OSS_20B, GPT_OSS_120B, MXFP4_BLOCK, ModelConfig
from ..tokenizer import SPECIAL_TOKENS

TINY = ModelConfig(
    num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=4, hidden_size=64,
    intermediate_size=96, head_dim=16, num_attention_heads=8, num_key_value_heads=2,
    sliding_window=8, vocab_size=201088,
)
PRESETS = {"tiny": TINY, "20b": GPT_OSS_20B, "120b": GPT_OSS_120B}
FP4_RMS = 2.93  # root mean square of the 16 E2M1 values, for sizing random scales


def _normal(shape, std, dtype=mx.bfloat16):
    return (mx.random.normal(shape) * std).astype(dtype)


def _mxfp4(shape_out_in: tuple[int, ...], target_std: float):
    """Random MXFP4 weight [..., out, in]: (blocks [..., out, in/32, 16] u8, scales [..., out, in/32] u8)."""
    *lead, out_dims, in_dims = shape_out_in
    nblocks = in_dims // MXFP4_BLOCK
    blocks = mx.random.randint(0, 256, (*lead, out_dims, nblocks, 16)).astype(mx.uint8)
    center = 127 + round(math.log2(target_std / FP4_RMS))
    scales = mx.random.randint(center - 1, center + 2, (*lead, out_dims, nblocks)).astype(mx.uint8)
    return blocks, scales


def layer_tensors(config: ModelConfig, i: int) -> dict[str, mx.array]:
    """One decoder layer in the Hugging Face layout (names without the 'model.' prefix)."""
    D, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    p = f"model.layers.{i}."
    t = {
        p + "input_layernorm.weight": 1 + _normal((D,), 0.1),
        p + "post_attention_layernorm.weight": 1 + _normal((D,), 0.1),
        p + "self_attn.q_proj.weight": _normal((H * hd, D), D**-0.5),
        p + "self_attn.q_proj.bias": _normal((H * hd,), 0.1),
        p + "self_attn.k_proj.weight": _normal((KV * hd, D), D**-0.5),
        p + "self_attn.k_proj.bias": _normal((KV * hd,), 0.1),
        p + "self_attn.v_proj.weight": _normal((KV * hd, D), D**-0.5),
        p + "self_attn.v_proj.bias": _normal((KV * hd,), 0.1),
        p + "self_attn.o_proj.weight": _normal((D, H * hd), (H * hd) ** -0.5),
        p + "self_attn.o_proj.bias": _normal((D,), 0.1),
        p + "self_attn.sinks": _normal((H,), 1.0),
        p + "mlp.router.weight": _normal((E, D), D**-0.5),
        p + "mlp.router.bias": _normal((E,), 0.1),
        p + "mlp.experts.gate_up_proj_bias": _normal((E, 2 * I), 0.1),
        p + "mlp.experts.down_proj_bias": _normal((E, D), 0.1),
    }
    gu_blocks, gu_scales = _mxfp4((E, 2 * I, D), D**-0.5)
    dn_blocks, dn_scales = _mxfp4((E, D, I), I**-0.5)
    t[p + "mlp.experts.gate_up_proj_blocks"] = gu_blocks
    t[p + "mlp.experts.gate_up_proj_scales"] = gu_scales
    t[p + "mlp.experts.down_proj_blocks"] = dn_blocks
    t[p + "mlp.experts.down_proj_scales"] = dn_scales
    return t


def outer_tensors(config: ModelConfig) -> dict[str, mx.array]:
    D, V = config.hidden_size, config.vocab_size
    return {
        "model.embed_tokens.weight": _normal((V, D), 1.0),
        "model.norm.weight": 1 + _normal((D,), 0.1),
        "lm_head.weight": _normal((V, D), D**-0.5),
    }


def _save_shards(out: Path, shards: list[dict[str, mx.array]], prefix="model") -> None:
    out.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"{prefix}-{k:05d}-of-{n:05d}.safetensors" if n > 1 else f"{prefix}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "pt"})
        for key, a in shard.items():
            weight_map[key] = name
            total += a.nbytes
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_hf(out: Path, config: ModelConfig, seed: int = 0, shard_bytes: int = 4 * 2**30,
             keep: bool = False) -> dict[str, mx.array] | None:
    """The Hugging Face layout. Returns all tensors when ``keep`` (small checkpoints)."""
    mx.random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": SPECIAL_TOKENS["<|startoftext|>"], "eos_token_id": list(config.eos_token_ids),
        "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"], "do_sample": True,
    }, indent=2))
    everything: dict[str, mx.array] = {}
    shards, current, size = [], {}, 0
    parts = [outer_tensors(config)] + [
        (lambda i=i: layer_tensors(config, i)) for i in range(config.num_hidden_layers)
    ]
    for part in parts:
        tensors = part() if callable(part) else part
        mx.eval(tensors)
        part_size = sum(a.nbytes for a in tensors.values())
        if current and size + part_size > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current.update(tensors)
        size += part_size
        if keep:
            everything.update(tensors)
    shards.append(current)
    _save_shards(out, shards)
    return everything if keep else None


def write_original(out: Path, config: ModelConfig, hf: dict[str, mx.array]) -> None:
    """OpenAI's original/ layout (as openai/gpt-oss-20b ships it) holding the same weights."""
    t = {
        "embedding.weight": hf["model.embed_tokens.weight"],
        "norm.scale": hf["model.norm.weight"],
        "unembedding.weight": hf["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"block.{i}."
        a = p + "self_attn."
        t[b + "attn.norm.scale"] = hf[p + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            t[b + f"attn.qkv.{kind}"] = mx.concatenate(
                [hf[a + f"{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")], axis=0)
            t[b + f"attn.out.{kind}"] = hf[a + f"o_proj.{kind}"]
        t[b + "attn.sinks"] = hf[a + "sinks"]
        t[b + "mlp.norm.scale"] = hf[p + "post_attention_layernorm.weight"]
        t[b + "mlp.gate.weight"] = hf[p + "mlp.router.weight"]
        t[b + "mlp.gate.bias"] = hf[p + "mlp.router.bias"]
        for ours, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            t[b + f"mlp.{ours}_weight.blocks"] = hf[p + f"mlp.experts.{theirs}_blocks"]
            t[b + f"mlp.{ours}_weight.scales"] = hf[p + f"mlp.experts.{theirs}_scales"]
            t[b + f"mlp.{ours}_bias"] = hf[p + f"mlp.experts.{theirs}_bias"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2))
    _save_shards(out, [t])


def write_mlx(out: Path, config: ModelConfig, hf: dict[str, mx.array],
              dense_bits: int | None = None, group_size: int = 64) -> None:
    """An mlx-lm style conversion: gate/up experts split, optionally affine-quantized dense layers."""
    t = {}
    for name, a in hf.items():
        if name.endswith(("_blocks", "_scales")):
            a = a.view(mx.uint32).flatten(-2) if name.endswith("_blocks") else a
            suffix = ".weight" if name.endswith("_blocks") else ".scales"
            base = name[: -len("_blocks")]
            if "gate_up_proj" in base:
                t[base.replace("gate_up_proj", "gate_proj") + suffix] = a[..., ::2, :]
                t[base.replace("gate_up_proj", "up_proj") + suffix] = a[..., 1::2, :]
            else:
                t[base + suffix] = a
        elif name.endswith("gate_up_proj_bias"):
            base = name[: -len("gate_up_proj_bias")]
            t[base + "gate_proj.bias"] = a[..., ::2]
            t[base + "up_proj.bias"] = a[..., 1::2]
        elif name.endswith("down_proj_bias"):
            t[name.replace("down_proj_bias", "down_proj.bias")] = a
        else:
            t[name] = a
    raw = config.to_hf_dict()
    if dense_bits:
        for name in list(t):
            dense = name.endswith(".weight") and (
                "self_attn" in name or "router" in name or "embed_tokens" in name or "lm_head" in name)
            if dense:
                w, s, b = mx.quantize(t[name], group_size=group_size, bits=dense_bits)
                base = name[: -len(".weight")]
                t[name], t[base + ".scales"], t[base + ".biases"] = w, s, b
        raw["quantization"] = {"group_size": group_size, "bits": dense_bits, "mode": "affine"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    _save_shards(out, [{k: mx.contiguous(v) for k, v in t.items()}])


def copy_tokenizer(out: Path, tokenizer_json: Path) -> None:
    dest = out / "tokenizer.json"
    if tokenizer_json.suffix == ".gz":
        with gzip.open(tokenizer_json, "rb") as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copy(tokenizer_json, dest)
    cfg = tokenizer_json.parent / "gpt-oss-tokenizer_config.json"
    if cfg.exists():
        shutil.copy(cfg, out / "tokenizer_config.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    for name in ("layers", "experts", "hidden", "intermediate", "vocab", "window", "heads",
                 "kv-heads", "head-dim"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--original", action="store_true", help="also write original/")
    ap.add_argument("--mlx-dir", type=Path, help="also write an mlx-lm style conversion here")
    ap.add_argument("--mlx-dense-bits", type=int, choices=[4, 8])
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json(.gz) to copy in")
    args = ap.parse_args(argv)

    changes = {k: v for k, v in {
        "num_hidden_layers": args.layers, "num_local_experts": args.experts,
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "vocab_size": args.vocab, "sliding_window": args.window,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
    }.items() if v is not None}
    if "num_hidden_layers" in changes:
        changes["layer_types"] = ()
    config = PRESETS[args.preset].replace(**changes)
    keep = args.original or args.mlx_dir is not None
    hf = write_hf(args.out, config, seed=args.seed, keep=keep)
    if args.original:
        write_original(args.out / "original", config, hf)
    if args.mlx_dir is not None:
        write_mlx(args.mlx_dir, config, hf, dense_bits=args.mlx_dense_bits)
    if args.tokenizer:
        copy_tokenizer(args.out, args.tokenizer)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""LoRA adapters for gpt-oss: low-rank updates beside frozen weights, saved apart from them.

    config = LoRAConfig(rank=8, alpha=16, targets=("attention", "experts"))
    apply_lora(model, config)              # freezes the model and wraps the target modules
    save_adapter(model, "out", config)     # out/adapters.safetensors + out/adapter_config.json
    load_adapter(model, "out")             # a base model plus a saved adapter
    fuse_dense(model)                      # attention/router adapters merged into their weights

Targets (``TARGETS``): ``attention`` (each layer's qkv_proj and o_proj), ``experts`` (gate_up_proj
and down_proj, one adapter per expert added to the MXFP4 gather-matmul's output, so the packed
weights stay frozen and packed), ``router``. The adapters are float32 and computed in float32;
their output is cast to the activations' dtype. ``alpha / rank`` scales the update, and B starts
at zero, so a fresh adapter changes nothing.

The fused MoE and router kernels read the packed weights directly; they apply only to the plain
modules, so an adapted layer runs the ops path (``kernels/moe.py``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .files import expand_user, read_json_file, regular_file_problem
from .model import Model, SwitchLinear

TARGETS = {
    "attention": ("self_attn.qkv_proj", "self_attn.o_proj"),
    "experts": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "router": ("mlp.router",),
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
TRAINING_STATE = "training_state.json"  # finetune's run: its step, settings and base's checksum
ADAPTER_FORMAT = "gptoss-mlx-lora"
# In a fused checkpoint: the expert adapters that were not merged (see fuse in cli/finetune.py).
FUSED_EXPERT_ADAPTER = "expert_adapter"


class AdapterError(ValueError):
    """An adapter that is missing, damaged, or does not fit the model."""


MAX_ALPHA = 65536.0  # far past any use (mlx-lm's default scale is 20): a typo, or a damaged config
# The least alpha (and learning rate) taken: 1e-300 passed "above 0", and alpha over the rank (or
# the rate) was 0 in float32: an adapter that learned or applied nothing, silently (helper-150).
LEAST_SETTING = 1e-30


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "experts")

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"rank must be a whole number of at least 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) \
                or not LEAST_SETTING <= self.alpha <= MAX_ALPHA or not math.isfinite(self.alpha):
            # (an adapter_config.json's 1e38 loaded, then every logit was NaN, "corrupt weights")
            raise AdapterError(f"alpha must be a number from {LEAST_SETTING:g} to {MAX_ALPHA:g}, got {self.alpha!r:.40}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AdapterError(f"targets must be some of {', '.join(TARGETS)}, got "
                               f"{', '.join(map(str, self.targets)) or 'none'}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"format": ADAPTER_FORMAT, "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets)}

    @classmethod
    def from_json(cls, data, where: str) -> LoRAConfig:
        if not isinstance(data, dict) or data.get("format") != ADAPTER_FORMAT:
            raise AdapterError(f"{where}: not a gptoss-mlx adapter (format must be {ADAPTER_FORMAT!r})")
        targets = data.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{where}: targets must be a list of names, got {targets!r:.60}")
        try:
            return cls(data.get("rank"), data.get("alpha"), tuple(targets))
        except AdapterError as e:
            raise AdapterError(f"{where}: {e}") from None


class LoRALinear(nn.Module):
    """``linear(x) + scale * (x @ A) @ B``: A (in, r), B (r, out), float32."""

    def __init__(self, linear: nn.Module, rank: int, scale: float):
        super().__init__()
        in_dims, out_dims = in_out(linear)
        self.linear = linear
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        z = (x.astype(mx.float32) @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)

    def delta(self) -> mx.array:
        """The update to the weight, (out, in)."""
        return self.scale * (self.lora_a @ self.lora_b).T


class LoRASwitchLinear(nn.Module):
    """Each token's chosen expert e: ``switch(x) + scale * B_e (A_e x)``; A (E, r, in),
    B (E, out, r), float32. The packed expert weights are only read."""

    def __init__(self, switch: SwitchLinear, rank: int, scale: float):
        super().__init__()
        num_experts = switch.bias.shape[0]
        in_dims, out_dims = in_out(switch)
        self.linear = switch
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (num_experts, rank, in_dims))
        self.lora_b = mx.zeros((num_experts, out_dims, rank))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(x.astype(mx.float32), self.lora_a.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)  # (..., 1, r)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)  # (..., 1, out)
        return y + (self.scale * z).astype(x.dtype)

    def delta(self) -> mx.array:
        """Each expert's update to its weight, (E, out, in)."""
        return self.scale * (self.lora_b @ self.lora_a)


def in_out(module: nn.Module) -> tuple[int, int]:
    """A linear layer's (input, output) sizes; quantized weights pack 32 // bits values a word."""
    if isinstance(module, SwitchLinear):  # packed MXFP4 experts
        return module.weight.shape[-1] * 32 // module.bits, module.bias.shape[1]
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):  # a --dense-bits model
        in_dims = in_dims * 32 // module.bits
    return in_dims, out_dims


def _wrap(module: nn.Module, rank: int, scale: float) -> nn.Module:
    if isinstance(module, SwitchLinear):
        return LoRASwitchLinear(module, rank, scale)
    return LoRALinear(module, rank, scale)


def apply_lora(model: Model, config: LoRAConfig) -> Model:
    """Freeze ``model`` and wrap its target modules in every layer (in place)."""
    if any(isinstance(m, (LoRALinear, LoRASwitchLinear)) for _, m in model.named_modules()):
        raise AdapterError("the model already has an adapter; load adapters into a base model")
    if "experts" in config.targets and getattr(model, "expert_pool", None) is not None:
        raise AdapterError("this adapter trains the experts, and at this memory limit the experts are "
                           "streamed, which adapters do not reach: give more memory (--memory-limit) (from Python: "
                           "memory_limit=) or use an adapter without experts (--targets attention)")
    paths = {p for t in config.targets for p in TARGETS[t]}
    smallest = min(min(in_out(m)) for layer in model.layers
                   for path, m in layer.named_modules() if path in paths)
    if config.rank > smallest:  # the update's rank cannot exceed a layer's smaller side
        raise AdapterError(f"LoRA rank {config.rank} is above the smallest size of an adapted layer "
                           f"({smallest}), where it adds memory and nothing else: use at most {smallest}")
    model.freeze()
    for layer in model.layers:
        wrapped = [(path, _wrap(m, config.rank, config.scale))
                   for path, m in layer.named_modules() if path in paths]
        layer.update_modules(tree_unflatten(wrapped))
    return model


def adapter_weights(model: Model) -> dict[str, mx.array]:
    """The adapter's tensors by parameter name (``layers.N....lora_a``)."""
    return {name: a for name, a in tree_flatten(model.parameters())
            if name.endswith((".lora_a", ".lora_b"))}


def save_adapter(model: Model, directory: str | os.PathLike, config: LoRAConfig,
                 weights_metadata: dict[str, str] | None = None, **metadata) -> Path:
    """Write ``adapters.safetensors`` (with ``weights_metadata``) and ``adapter_config.json``
    (with ``metadata``, e.g. the base model), each through a temporary file and a rename."""
    for tmp, path in adapter_files(model, directory, config, weights_metadata, **metadata):
        os.replace(tmp, path)
    return Path(directory)


def adapter_files(model: Model, directory: str | os.PathLike, config: LoRAConfig,
                  weights_metadata: dict[str, str] | None = None, **metadata) -> list[tuple[Path, Path]]:
    """The adapter's two files written under temporary names beside their places (the
    process's own): (temporary, final) pairs, to be renamed once whatever is saved with them is
    written too. A failure leaves no temporary file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = [(directory / f".{ADAPTER_WEIGHTS}.{os.getpid()}.tmp.safetensors", directory / ADAPTER_WEIGHTS),
             (directory / f".{ADAPTER_CONFIG}.{os.getpid()}.tmp", directory / ADAPTER_CONFIG)]
    try:
        mx.save_safetensors(str(pairs[0][0]), adapter_weights(model),
                            metadata={"format": "mlx", **(weights_metadata or {})})
        pairs[1][0].write_text(json.dumps({**config.to_json(), **metadata}, indent=2))
    except BaseException:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
        raise
    return pairs


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    path = expand_user(directory, AdapterError) / ADAPTER_CONFIG
    if path.parent.exists() and not path.parent.is_dir():
        raise AdapterError(f"{path.parent} is a file, not an adapter directory")
    if not path.parent.is_dir():
        raise AdapterError(f"{path.parent}: no such adapter directory")
    if not os.path.lexists(path):
        raise AdapterError(f"{path.parent}: not an adapter directory (no {ADAPTER_CONFIG})")
    return LoRAConfig.from_json(read_json_file(path, AdapterError), str(path))


def load_adapter(model: Model, directory: str | os.PathLike) -> LoRAConfig:
    """Wrap ``model``'s target modules and load the saved adapter into them. Every tensor must
    be there with its shape: a wrong or partial file is an AdapterError naming the tensor."""
    directory = expand_user(directory, AdapterError)
    config = read_adapter_config(directory)
    apply_lora(model, config)
    load_adapter_weights(model, directory / ADAPTER_WEIGHTS)
    return config


def non_finite(weights: dict[str, mx.array]) -> str | None:
    """The name of the first tensor holding NaN or infinity, or None."""
    return next((name for name, a in weights.items() if not mx.all(mx.isfinite(a)).item()), None)


def load_adapter_weights(model: Model, file: Path) -> None:
    """Load an adapter's tensors into ``model``, already wrapped for it (apply_lora)."""
    problem = regular_file_problem(file)  # (a directory or a FIFO read as MLX's "Unable to read 8 bytes")
    if problem:
        raise AdapterError(f"{file}: {problem}")
    try:
        weights = mx.load(str(file))
    except Exception as e:  # noqa: BLE001 - MLX raises plain exceptions for bad files
        raise AdapterError(f"{file}: cannot read the adapter ({e})") from None
    expected = adapter_weights(model)
    for name, array in weights.items():
        if name not in expected:
            raise AdapterError(f"{file}: {name} is not an adapter tensor of this model")
        if array.shape != expected[name].shape:
            raise AdapterError(f"{file}: {name} has shape {list(array.shape)}, this model with this "
                               f"adapter_config.json needs {list(expected[name].shape)} (trained on "
                               "another model, or its adapter_config.json edited?)")
        if not mx.issubdtype(array.dtype, mx.floating):
            kind = str(array.dtype).rsplit(".", 1)[-1]  # mlx.core.int32 -> int32
            raise AdapterError(f"{file}: {name} holds {kind} values; an adapter's are floating point")
    bad = non_finite(weights)
    if bad:
        raise AdapterError(f"{file}: {bad} holds NaN or infinite values (saved from a run that diverged?)")
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        raise AdapterError(f"{file}: no tensor {missing[0]} ({len(missing)} missing)")
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())


# ----------------------------------------------------------------------------------- fusing
def _replace(model: Model, kind: type, make) -> None:
    """Replace every ``kind`` module in the layers with ``make(module)``."""
    for layer in model.layers:
        found = [(path, make(m)) for path, m in layer.named_modules() if isinstance(m, kind)]
        if found:
            layer.update_modules(tree_unflatten(found))


def fuse_dense(model: Model) -> None:
    """Merge each attention/router adapter into its weight: W + scale * (A B)^T, in W's dtype."""
    def merged(m: LoRALinear) -> nn.Module:
        if not isinstance(m.linear, nn.Linear) or isinstance(m.linear, nn.QuantizedLinear):
            raise AdapterError("fusing needs the dense weights unquantized: fuse into a checkpoint whose "
                               "dense layers are bf16 (not one `models convert` wrote), loaded without --dense-bits")
        linear = m.linear
        linear.weight = (linear.weight.astype(mx.float32) + m.delta()).astype(linear.weight.dtype)
        return linear

    _replace(model, LoRALinear, merged)


@dataclass
class RequantizeReport:
    delta_rms: float  # the adapters' own change to the expert weights
    error_rms: float  # requantized weights minus (weights + change)

    def summary(self) -> str:
        return (f"requantizing the experts to MXFP4: error RMS {self.error_rms:.3g} against the "
                f"adapters' change of RMS {self.delta_rms:.3g} to the expert weights (the error is "
                f"{self.error_rms / max(self.delta_rms, 1e-30):.2f}x the change)")


def requantize_experts(model: Model) -> RequantizeReport:
    """Merge each expert adapter into its MXFP4 weights (dequantize, add, quantize again), one
    expert at a time, and measure the rounding against the exact merged weights."""
    sums = {"delta": 0.0, "error": 0.0, "n": 0}

    def merged(m: LoRASwitchLinear) -> SwitchLinear:
        switch = m.linear
        if switch.mode != "mxfp4":
            raise AdapterError(f"requantizing needs MXFP4 experts, these are {switch.mode}")
        delta = m.delta()
        weights, scales = [], []
        for e in range(delta.shape[0]):
            w = mx.dequantize(switch.weight[e], switch.scales[e], group_size=32, bits=4, mode="mxfp4")
            target = w.astype(mx.float32) + delta[e]
            if not mx.all(mx.isfinite(target)).item():  # MXFP4 would round it to zeros, silently
                raise AdapterError("merged with the adapter, an expert's weights hold NaN or infinite "
                                   "values (its alpha or its weights overflow): nothing was written")
            q, s = mx.quantize(target, group_size=32, bits=4, mode="mxfp4")
            err = mx.dequantize(q, s, group_size=32, bits=4, mode="mxfp4") - target
            sums["delta"] += mx.sum(delta[e] ** 2).item()
            sums["error"] += mx.sum(err**2).item()
            sums["n"] += target.size
            weights.append(q)
            scales.append(s)
        switch.weight, switch.scales = mx.stack(weights), mx.stack(scales)
        mx.eval(switch.weight, switch.scales)
        return switch

    _replace(model, LoRASwitchLinear, merged)
    n = max(sums["n"], 1)
    return RequantizeReport(math.sqrt(sums["delta"] / n), math.sqrt(sums["error"] / n))


def expert_adapter_config(config: LoRAConfig) -> LoRAConfig | None:
    """What stays of ``config`` after fuse_dense: the expert adapters, if any."""
    return LoRAConfig(config.rank, config.alpha, ("experts",)) if "experts" in config.targets else None


def hf_tensors(model: Model) -> dict[str, mx.array]:
    """The model's weights under the published Hugging Face names and layout (the inverse of
    loading's mapping): q/k/v split out of qkv_proj, experts as uint8 ``*_blocks``/``*_scales``."""
    config = model.config
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    out = {}
    for name, array in tree_flatten(model.parameters()):
        if name.endswith((".lora_a", ".lora_b")):
            continue
        name = name.replace(".linear.", ".")  # an expert adapter left beside its weights
        if ".qkv_proj." in name:
            parts = mx.split(array, [q_rows, q_rows + kv_rows])
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out["model." + name.replace("qkv_proj", proj)] = part
        elif ".experts." in name:
            base, kind = name.rsplit(".", 1)
            if kind == "weight":  # [E, out, in/8] uint32 -> [E, out, in/32, 16] uint8
                array = array.view(mx.uint8).reshape(*array.shape[:-1], -1, 16)
                kind = "blocks"
            out[f"model.{base}_{kind}"] = array
        else:
            out[name if name.startswith("lm_head") else "model." + name] = array
    return out

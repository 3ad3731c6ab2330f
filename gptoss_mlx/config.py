"""Model configuration: every published form of gpt-oss's config.json read into one validated object.

Hugging Face names (``rope_scaling`` or the newer ``rope_parameters``, ``layer_types``,
``num_local_experts`` ...) and the ``original/config.json`` names used by OpenAI's reference code
(``num_experts``, ``experts_per_token``, ``rope_ntk_alpha`` ...) both map onto :class:`ModelConfig`.
Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import brief_number, float64_holds, read_json_file
from .tokenizer import SPECIAL_TOKENS

SLIDING = "sliding_attention"
FULL = "full_attention"
MXFP4_BLOCK = 32  # values per MX block (one E8M0 scale each)
MAX_DIMENSION = 1 << 24  # any size, count or vocabulary of a config (gpt-oss: at most 201,088)
MAX_POSITIONS = (1 << 31) - 1  # a context length (gpt-oss: 131,072)
QUANTIZATION_BITS = (2, 3, 4, 5, 6, 8)  # a converted checkpoint's dense layers (MLX's affine quantization)


class ConfigError(ValueError):
    """A config.json that cannot describe a gpt-oss model."""


# Fields every published config.json form has (any one alias); the rest have defaults.
REQUIRED = {
    "num_hidden_layers": ("num_hidden_layers",),
    "num_local_experts": ("num_local_experts", "num_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "experts_per_token"),
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size",),
    "head_dim": ("head_dim",),
    "num_attention_heads": ("num_attention_heads",),
    "num_key_value_heads": ("num_key_value_heads",),
}


@dataclass(frozen=True)
class ModelConfig:
    # Defaults are gpt-oss-120b's published values; 20b differs in layers and experts.
    num_hidden_layers: int = 36
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()  # empty: sliding on even layers, full on odd (the reference)
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    rope_theta: float = 150000.0
    # YaRN. factor 1.0 means plain RoPE.
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0  # original/config.json: rope_ntk_beta
    rope_beta_slow: float = 1.0  # original/config.json: rope_ntk_alpha
    rope_original_max_position_embeddings: int = 4096  # original: initial_context_length
    rope_truncate: bool = False  # False: the correction range is not rounded (the reference)
    max_position_embeddings: int = 131072
    eos_token_ids: tuple[int, ...] = tuple(SPECIAL_TOKENS[t] for t in ("<|return|>", "<|endoftext|>", "<|call|>"))
    # MLX affine quantization of dense layers ({"group_size", "bits", "mode", per-path overrides})
    # as written by mlx-lm conversions; None for the published bf16 checkpoints.
    quantization: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        positive = [
            "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "vocab_size",
            "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
            "num_key_value_heads", "sliding_window", "max_position_embeddings",
            "rope_original_max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r:.100}")
            # far past any gpt-oss (its shapes would overflow the arrays' 32-bit sizes long before
            # memory ran out: a traceback instead of a message naming the value)
            bound = MAX_POSITIONS if name.endswith("max_position_embeddings") else MAX_DIMENSION
            if value > bound:
                raise ConfigError(f"{name} must be at most {bound:,}, got {_shown(value)}")
        for name in ["rms_norm_eps", "swiglu_limit", "rope_theta", "rope_scaling_factor",
                     "rope_beta_fast", "rope_beta_slow"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not float64_holds(value):
                raise ConfigError(f"{name} must be a positive finite number, got {_shown(value)}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ["hidden_size", "intermediate_size"]:
            if getattr(self, name) % MXFP4_BLOCK:
                raise ConfigError(
                    f"{name} ({getattr(self, name)}) must be a multiple of {MXFP4_BLOCK} "
                    "for MXFP4 experts"
                )
        if SLIDING in self.layer_types and self.sliding_window > self.max_position_embeddings:
            # (a window past the context is full attention; its ring of that many slots each was
            # allocated whole, which the memory plan, counting the context's, did not see)
            raise ConfigError(f"sliding_window ({self.sliding_window:,}) is longer than max_position_embeddings "
                              f"({self.max_position_embeddings:,})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"unknown layer_types {unknown}; expected {SLIDING!r} or {FULL!r}")
        if self.rope_beta_fast <= self.rope_beta_slow:
            raise ConfigError(
                f"YaRN beta_fast ({self.rope_beta_fast}) must exceed beta_slow "
                f"({self.rope_beta_slow})"
            )
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.eos_token_ids):
            raise ConfigError(f"eos_token_id must hold token ids, got {self.eos_token_ids!r:.100}")
        if self.rope_scaling_factor > 1.0:
            self._validate_yarn_range()

    def _validate_yarn_range(self) -> None:
        """The reference asserts 0 < low < high < head_dim/2 - 1 (transformers clamps instead);
        a config outside it is refused here rather than silently clamped."""
        if self.rope_theta <= 1.0:
            raise ConfigError(f"rope_theta must exceed 1 for YaRN, got {self.rope_theta!r}")
        low, high = yarn_correction_range(self)
        limit = self.head_dim / 2 - 1
        if not 0 < low < high < limit:
            raise ConfigError(
                f"YaRN correction range [{low:.3f}, {high:.3f}] (from beta_fast="
                f"{self.rope_beta_fast}, beta_slow={self.rope_beta_slow}, "
                f"original_max_position_embeddings={self.rope_original_max_position_embeddings}, "
                f"rope_theta={self.rope_theta}) must lie inside (0, head_dim/2 - 1 = {limit:g})"
            )

    # ------------------------------------------------------------------ views
    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(t == SLIDING for t in self.layer_types)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json form (what the published checkpoints carry)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
                "truncate": self.rope_truncate,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": self.rope_original_max_position_embeddings,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "eos_token_id": list(self.eos_token_ids)[0],
            "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"],
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "initializer_range": 0.02,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
        }

    def to_original_dict(self) -> dict[str, Any]:
        """The original/config.json form read by OpenAI's reference code."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Read any published config.json form; unknown extra keys are ignored."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type is not None and model_type != "gpt_oss":
            raise ConfigError(f"model_type is {model_type!r:.100}, not 'gpt_oss'")
        if raw.get("tie_word_embeddings"):
            raise ConfigError("tie_word_embeddings is true, but gpt-oss has an untied unembedding")
        if raw.get("attention_bias") is False:
            raise ConfigError("attention_bias is false, but gpt-oss attention has biases")
        _check_required(raw)
        _check_quantization_config(raw.get("quantization_config"))

        kw: dict[str, Any] = {}
        _take(raw, kw, "num_hidden_layers", ["num_hidden_layers"])
        _take(raw, kw, "num_local_experts", ["num_local_experts", "num_experts"])
        _take(raw, kw, "num_experts_per_tok", ["num_experts_per_tok", "experts_per_token"])
        for name in ["vocab_size", "hidden_size", "intermediate_size", "head_dim",
                     "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                     "swiglu_limit", "max_position_embeddings"]:
            _take(raw, kw, name, [name])
        if raw.get("sliding_window") is not None:
            kw["sliding_window"] = raw["sliding_window"]
        layer_types = raw.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
                raise ConfigError(f"layer_types must be a list of strings, got {layer_types!r:.100}")
            kw["layer_types"] = tuple(layer_types)

        _read_rope(raw, kw)

        eos = raw.get("eos_token_id")
        if eos is not None:
            # <|return|>, <|endoftext|> and <|call|> always end an assistant action.
            kw["eos_token_ids"] = tuple(dict.fromkeys(token_ids(eos, "eos_token_id")
                                                      + list(cls.eos_token_ids)))
        quant = raw.get("quantization")
        if quant is not None:
            if not isinstance(quant, dict) or not {"group_size", "bits"} <= quant.keys():
                raise ConfigError(f"quantization must hold group_size and bits, got {quant!r:.100}")
            bits = _integer(quant["bits"], "quantization.bits")  # (a string made the memory plan raise)
            if bits not in QUANTIZATION_BITS:
                raise ConfigError(f"quantization.bits must be one of {', '.join(map(str, QUANTIZATION_BITS))} "
                                  f"(MLX's), got {bits}")
            if _integer(quant["group_size"], "quantization.group_size") < 1:
                raise ConfigError(f"quantization.group_size must be positive, got {quant['group_size']}")
            kw["quantization"] = quant
        if any(t == SLIDING for t in kw.get("layer_types", ())) and "sliding_window" not in kw:
            raise ConfigError("layer_types names sliding_attention layers but sliding_window is missing")
        if kw.get("sliding_window") is None and "layer_types" not in kw and "sliding_window" in raw:
            raise ConfigError("sliding_window is null but no layer_types say which layers are full")
        try:
            return cls(**kw)
        except TypeError as e:  # a value of the wrong type, e.g. a list where an int belongs
            raise ConfigError(str(e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        raw = read_json_file(path, ConfigError)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def token_ids(value, name: str) -> list[int]:
    """A token id or a list of them (``eos_token_id``); ConfigError naming ``name`` otherwise."""
    ids = value if isinstance(value, list) else [value]
    if not ids or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
        raise ConfigError(f"{name} must be a token id or a list of token ids, got {value!r:.100}")
    return ids


def _check_required(raw: dict) -> None:
    """A missing required field is named, with the unknown key that looks like a misspelling."""
    known = {alias for aliases in REQUIRED.values() for alias in aliases}
    known |= set(ModelConfig().to_hf_dict()) | set(ModelConfig().to_original_dict())
    unknown = [k for k in raw if k not in known]
    for name, aliases in REQUIRED.items():
        if not any(raw.get(a) is not None for a in aliases):
            close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.8)
            hint = f" (is {close[0]!r} a misspelling of it?)" if close else ""
            raise ConfigError(f"required field {name} is missing{hint}")


def _check_quantization_config(quant) -> None:
    """The published checkpoints say mxfp4; mlx-lm conversions copy their own settings here."""
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise ConfigError(f"quantization_config must be a JSON object, got {quant!r:.100}")
    method = quant.get("quant_method", "mxfp4")
    if method != "mxfp4":
        raise ConfigError(f"quantization_config.quant_method is {method!r:.100}; only mxfp4 checkpoints "
                          "(as published) and MLX conversions can be loaded")


def _shown(value) -> str:
    """A config value in a message (a whole number with thousands separators)."""
    if isinstance(value, int) and not isinstance(value, bool) and len(str(value)) <= 30:
        return f"{value:,}"
    return brief_number(value) if isinstance(value, (int, float)) else f"{value!r:.40}"


def _number(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r:.100}")
    if isinstance(value, int) and not float64_holds(value):  # (infinity itself: the range checks')
        raise ConfigError(f"{name} must be a finite number, got {_shown(value)}")
    return float(value)


def _integer(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r:.100}")
    return value


def _take(raw: dict, kw: dict, name: str, aliases: list[str]) -> None:
    """Copy the first alias present; aliases that disagree are an error."""
    present = {a: raw[a] for a in aliases if raw.get(a) is not None}
    if len(set(map(repr, present.values()))) > 1:
        raise ConfigError(f"contradictory values for {name}: {present}")
    if present:
        kw[name] = next(iter(present.values()))


def _read_rope(raw: dict, kw: dict) -> None:
    """rope_theta and YaRN from rope_scaling, rope_parameters, or the original names."""
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    for name, value in [("rope_scaling", scaling), ("rope_parameters", params)]:
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a JSON object, got {value!r:.100}")
    if scaling is not None and params is not None:
        common = set(scaling) & set(params) - {"rope_theta"}
        clash = {k: (scaling[k], params[k]) for k in common if scaling[k] != params[k]}
        if clash:
            raise ConfigError(f"rope_scaling and rope_parameters disagree: {clash}")
    rope = {**(params or {}), **(scaling or {})}
    thetas = {_number(v, "rope_theta") for v in [raw.get("rope_theta"), rope.get("rope_theta")]
              if v is not None}
    if len(thetas) > 1:
        raise ConfigError(f"contradictory rope_theta values {sorted(thetas)}")
    if thetas:
        kw["rope_theta"] = float(thetas.pop())

    if rope:
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type in ("default", None) and rope.get("factor") in (None, 1, 1.0):
            kw["rope_scaling_factor"] = 1.0
        elif rope_type != "yarn":
            raise ConfigError(f"unsupported rope type {rope_type!r:.100}; gpt-oss uses 'yarn'")
        else:
            for ours, theirs in [("rope_scaling_factor", "factor"),
                                 ("rope_beta_fast", "beta_fast"),
                                 ("rope_beta_slow", "beta_slow")]:
                if rope.get(theirs) is not None:
                    kw[ours] = _number(rope[theirs], f"rope_scaling.{theirs}")
            if rope.get("original_max_position_embeddings") is not None:
                kw["rope_original_max_position_embeddings"] = _integer(
                    rope["original_max_position_embeddings"], "rope_scaling.original_max_position_embeddings")
            if rope.get("truncate") is not None:
                if not isinstance(rope["truncate"], bool):
                    raise ConfigError(f"rope truncate must be true or false, got {rope['truncate']!r:.100}")
                kw["rope_truncate"] = rope["truncate"]
            # Absent: the reference never rounds (transformers would default to rounding).
    # original/config.json names
    for ours, theirs in [("rope_scaling_factor", "rope_scaling_factor"),
                         ("rope_beta_slow", "rope_ntk_alpha"),
                         ("rope_beta_fast", "rope_ntk_beta")]:
        if raw.get(theirs) is not None:
            value = _number(raw[theirs], theirs)
            if ours in kw and kw[ours] != value:
                raise ConfigError(f"contradictory values for {ours}: {kw[ours]} and {theirs}={value}")
            kw[ours] = value
    init_ctx = raw.get("initial_context_length")
    if init_ctx is not None:
        init_ctx = _integer(init_ctx, "initial_context_length")
        orig = kw.get("rope_original_max_position_embeddings")
        if orig is not None and orig != init_ctx:
            raise ConfigError(
                f"contradictory values: original_max_position_embeddings={orig} but "
                f"initial_context_length={init_ctx}"
            )
        kw["rope_original_max_position_embeddings"] = init_ctx
        if "max_position_embeddings" not in kw:
            factor = kw.get("rope_scaling_factor", ModelConfig.rope_scaling_factor)
            kw["max_position_embeddings"] = int(init_ctx * factor)


def yarn_correction_range(config: ModelConfig) -> tuple[float, float]:
    """YaRN's (low, high) dimensions, unrounded (gpt-oss.md 1.4: 8.092779, 17.398025)."""
    d, base = config.head_dim, config.rope_theta
    ctx = config.rope_original_max_position_embeddings

    def correction_dim(beta: float) -> float:
        return d / 2 * math.log(ctx / (beta * 2 * math.pi)) / math.log(base)

    return correction_dim(config.rope_beta_fast), correction_dim(config.rope_beta_slow)



GPT_OSS_20B = ModelConfig(num_hidden_layers=24, num_local_experts=32)
GPT_OSS_120B = ModelConfig()
PRESETS = {"gpt-oss-20b": GPT_OSS_20B, "gpt-oss-120b": GPT_OSS_120B}

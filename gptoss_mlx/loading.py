"""Load a gpt-oss checkpoint: find it, read its config, map its tensors, check them, load lazily.

Three layouts are understood (gpt-oss.md 2.1, 2.2):
- ``hf``: the published Hugging Face layout, ``model.layers.N.mlp.experts.*_blocks``/``*_scales``;
- ``original``: OpenAI's ``original/`` layout, ``block.N.attn.qkv``, ``mlp1_weight.blocks``, ...;
- ``mlx``: mlx-lm conversions, split ``gate_proj``/``up_proj`` experts and affine-quantized
  dense layers (``.scales``/``.biases``).

The MXFP4 bytes of both OpenAI layouts are already MLX's ``mxfp4`` layout: a block tensor
[E, out, in/32, 16] of uint8 is viewed as [E, out, in/8] uint32, no copy and no dequantization.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
import warnings
import zlib
from urllib.parse import urlsplit
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, ModelConfig, token_ids
from .distributed import SHARDINGS, shard_part, share_config
from .files import CheckpointError, expand_user, read_json_file, regular_file_problem
from .lora import ADAPTER_CONFIG, FUSED_EXPERT_ADAPTER, TRAINING_STATE, load_adapter, read_adapter_config
from .memory import (
    DEFAULT_CONTEXT, DENSE_BITS, MemoryPlan, checkpoint_dense_bits, choose_plan, dense_bytes, kv_cache_bytes,
    limit_or_more, limit_size, round_up_gb, size, total_experts,
)
from .model import Model
from .tokenizer import HarmonyEncoding, load_tokenizer

DEFAULT_MODEL = "openai/gpt-oss-20b"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken"]
HUB_IGNORE = ["original/*", "metal/*"]

FLOAT_DTYPES = ("F16", "BF16", "F32")
PACKED_DTYPES = ("U8", "U32")  # MXFP4 blocks and scales, MLX-quantized weights
FINITE_SAMPLE = 1 << 14  # values per tensor checked for NaN/Inf at load

_SAFETENSORS_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
    "U32": mx.uint32, "I32": mx.int32, "U64": mx.uint64, "I64": mx.int64,
    "F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # of the tensor's first byte in the file


def _check_file(path: Path) -> None:
    """CheckpointError naming ``path`` unless it is a regular file (checked before opening)."""
    problem = regular_file_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")


# --------------------------------------------------------------------------- finding files
def resolve_checkpoint(path_or_repo: str | os.PathLike | None) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded or from the cache.
    None is the default model (an empty name is an error, not the default)."""
    if isinstance(path_or_repo, bytes):
        path_or_repo = os.fsdecode(path_or_repo)
    if path_or_repo is not None and not isinstance(path_or_repo, (str, os.PathLike)):
        raise TypeError(f"a model is a checkpoint directory or a Hugging Face repo id, got "
                        f"{type(path_or_repo).__name__} {path_or_repo!r:.60}")
    source = DEFAULT_MODEL if path_or_repo is None else os.fspath(path_or_repo)
    if not source.strip():
        raise CheckpointError("the model name is empty: name a local checkpoint directory or a "
                              f"Hugging Face repo id (or pass None for {DEFAULT_MODEL})")
    local = expand_user(source, CheckpointError)
    if os.path.lexists(local):
        if not local.is_dir():
            what = regular_file_problem(local) or "is a file"
            raise CheckpointError(f"{local}: expected a checkpoint directory, but it {what}")
        return local
    if not looks_like_repo_id(source):
        raise CheckpointError(f"{source}: no such directory (and not a Hugging Face repo id)")
    return download(source)


def looks_like_repo_id(source: str) -> bool:
    """``owner/name`` as the Hugging Face Hub spells repo ids (not a relative or home path)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/", "~"))


def download(repo_id: str) -> Path:
    """A Hugging Face repo's checkpoint files, from the cache or downloaded."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a dependency
        raise CheckpointError(f"huggingface-hub is needed to download {repo_id}: {e}") from None
    try:
        # Progress bars and resuming come from huggingface-hub; the cache is reused.
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS,
                                      ignore_patterns=HUB_IGNORE, local_files_only=offline()))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face Hub") from None
    except GatedRepoError:
        raise CheckpointError(f"{repo_id}: gated; log in with `hf auth login` first") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(not_downloaded(repo_id)) from None
    except OSError as e:
        raise CheckpointError(f"{repo_id}: download failed ({e}); run again to resume") from None


def offline() -> bool:
    """HF_HUB_OFFLINE is set, or the Hub's host does not resolve (no network: asking it anyway,
    huggingface-hub retries for over 20 s before it gives up)."""
    return offline_set() or _hub_unresolved()


def offline_set() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_unresolved() -> bool:
    """The Hub's host name has no address here (behind a proxy, the proxy resolves it: not asked)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    from huggingface_hub import constants

    host = urlsplit(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return True
    except (OSError, UnicodeError):
        return False
    return False


def not_downloaded(repo_id: str, pulling: bool = False) -> str:
    """One line for a repo that is not in the cache while the Hub cannot be used; ``pulling``:
    said to `models pull`, which is what the line otherwise tells one to run."""
    why = "HF_HUB_OFFLINE is set" if offline_set() else "the Hub cannot be reached"
    if pulling:
        again = "unset HF_HUB_OFFLINE and run this again" if offline_set() else "run this again when online"
        return f"{repo_id} cannot be downloaded: {why}; {again}"
    return (f"{repo_id} is not downloaded and {why}: download it when online (`gptoss-mlx models "
            f"pull {repo_id}`), or name a local checkpoint directory instead")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of one file, checked against the file's size: every
    tensor's bytes lie inside the data, match its dtype and shape, and overlap no other's."""
    _check_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len})")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    if not isinstance(header.get("__metadata__") or {}, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    data_size = size - 8 - header_len
    infos, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _header_entry(path, name, entry)
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{path}: tensor {name} lies outside the file (bytes {begin}..{end} of "
                f"{data_size}); the file is truncated or corrupt"
            )
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].size
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name} is {dtype} {list(shape)} ({nbytes} bytes) "
                                  f"but its data_offsets span {end - begin} bytes")
        infos[name] = TensorInfo(path, dtype, shape, 8 + header_len + begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap (data_offsets)")
    return infos


def _header_entry(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry, each of the right JSON type."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: corrupt safetensors entry for {name} (not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r:.100}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name} has an invalid shape {shape!r:.100}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name} has invalid data_offsets {offsets!r:.100} "
                              "(expected two integers)")
    return dtype, tuple(shape), tuple(offsets)


def _weight_map(directory: Path) -> dict[str, Path] | None:
    """model.safetensors.index.json's tensor -> shard file, checked; None without an index."""
    index = directory / "model.safetensors.index.json"
    if not os.path.lexists(index):
        return None
    data = read_json_file(index, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map must be a non-empty JSON object of tensor "
                              f"name -> file name, got {weight_map!r:.80}")
    out = {}
    for name, file in weight_map.items():
        if (not isinstance(file, str) or Path(file).name != file or file in (".", "..")
                or not file.endswith(".safetensors")):
            raise CheckpointError(f"{index}: weight_map[{name!r:.100}] must name a .safetensors file "
                                  f"in {directory}, got {file!r:.100}")
        out[name] = directory / file
    return out


class WeightsMissing(CheckpointError):
    """A checkpoint without (some of) its weight files: a download refused or not finished."""


def _weight_files(directory: Path) -> list[Path]:
    weight_map = _weight_map(directory)
    files = sorted(set(weight_map.values())) if weight_map else sorted(directory.glob("*.safetensors"))
    for f in files:
        try:
            os.lstat(f)
        except FileNotFoundError:
            raise WeightsMissing(f"{f}: missing checkpoint file (listed in "
                                 "model.safetensors.index.json)") from None
        except OSError as e:  # (a folder that can be listed but not entered: "missing" misled)
            raise CheckpointError(f"{f}: cannot be read ({e.strerror or e})") from None
        _check_file(f)
    return files


def files_digest(files: list[Path], samples: int = 8, size: int = 4096) -> int:
    """A 31-bit checksum of ``samples`` blocks of ``size`` bytes spread over each file (the
    first holds the safetensors header): the same wherever the same files are (the ranks of a
    run across machines compare it), different for other weights, and read in milliseconds."""
    crc = 0
    for f in sorted(files, key=lambda f: f.name):
        length = f.stat().st_size
        with open(f, "rb") as handle:
            for k in range(samples):
                handle.seek(k * max(length - size, 0) // (samples - 1))
                crc = zlib.crc32(handle.read(size), crc)
    return crc & 0x7FFFFFFF


def tensors_digest(infos: dict[str, TensorInfo], size: int = 1024) -> int:
    """A 31-bit checksum of every tensor's name, shape and dtype and of ``size`` bytes at its
    start, middle and end: a fine-tune fused into some of the tensors (the attention's alone)
    changes it, where :func:`files_digest`'s blocks spread over whole files can all miss them.
    About a megabyte read for 20b; what the ranks of a distributed run compare."""
    crc = 0
    handles: dict[Path, object] = {}
    try:
        for name in sorted(infos):
            info = infos[name]
            crc = zlib.crc32(f"{name}{info.shape}{info.dtype}".encode(), crc)
            nbytes = math.prod(info.shape) * _SAFETENSORS_DTYPES[info.dtype].size
            handle = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
            for at in sorted({0, max(nbytes - size, 0) // 2, max(nbytes - size, 0)}):
                handle.seek(info.offset + at)
                crc = zlib.crc32(handle.read(min(size, nbytes)), crc)
    finally:
        for handle in handles.values():
            handle.close()
    return crc & 0x7FFFFFFF


def checkpoint_digest(directory: Path) -> int:
    """:func:`files_digest` of a checkpoint's weight files: the same checkpoint wherever it lies."""
    return files_digest(_weight_files(find_layout(directory)[1]))


def adapter_base_note(adapter: str | os.PathLike, directory: Path) -> str | None:
    """A note where ``adapter`` was trained on other weights than those in ``directory`` (its
    training state records its base's checksum); None where it was not, or cannot say (an
    adapter from elsewhere)."""
    try:
        folder = expand_user(adapter)
        trained_on = json.loads((folder / TRAINING_STATE).read_text())["base_digest"]
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model", "another checkpoint")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if trained_on == checkpoint_digest(Path(directory)):
        return None
    return (f"the adapter {folder} was trained on other weights ({base}) than those in {directory}: "
            "its changes were made for those")


def find_layout(directory: Path) -> tuple[str, Path]:
    """(layout, directory holding its config.json and weights)."""
    for candidate in (directory, directory / "original"):
        try:
            is_dir = candidate.is_dir()
            if is_dir:
                os.listdir(candidate)  # (glob found nothing in a folder it could not read: "no weights")
        except OSError as e:  # (a folder that cannot be read: PermissionError's traceback)
            raise CheckpointError(f"{e.filename or candidate}: cannot be read ({e.strerror or e})") from None
        files = _weight_files(candidate) if is_dir else []
        if not files:
            continue
        if not os.path.lexists(candidate / "config.json"):
            raise CheckpointError(f"{candidate}: safetensors found but no config.json")
        names = set()
        for f in files[:1]:
            names |= read_safetensors_header(f).keys()
        all_names = " ".join(names)
        if "block." in all_names or "embedding.weight" in names:
            return "original", candidate
        if "_blocks" in all_names:
            return "hf", candidate
        config = read_json_file(candidate / "config.json", ConfigError)
        if isinstance(config, dict) and "quantization" in config or ".experts.gate_proj." in all_names:
            return "mlx", candidate
        return "hf", candidate
    raise WeightsMissing(f"{directory}: no *.safetensors weights found")


# --------------------------------------------------------------------------- name mapping
_ORIGINAL_RENAMES = [
    (r"^embedding\.weight$", "embed_tokens.weight"),
    (r"^unembedding\.weight$", "lm_head.weight"),
    (r"^norm\.scale$", "norm.weight"),
    (r"^block\.(\d+)\.attn\.norm\.scale$", r"layers.\1.input_layernorm.weight"),
    (r"^block\.(\d+)\.attn\.qkv\.(weight|bias)$", r"layers.\1.self_attn.qkv_proj.\2"),
    (r"^block\.(\d+)\.attn\.sinks$", r"layers.\1.self_attn.sinks"),
    (r"^block\.(\d+)\.attn\.out\.(weight|bias)$", r"layers.\1.self_attn.o_proj.\2"),
    (r"^block\.(\d+)\.mlp\.norm\.scale$", r"layers.\1.post_attention_layernorm.weight"),
    (r"^block\.(\d+)\.mlp\.gate\.(weight|bias)$", r"layers.\1.mlp.router.\2"),
    (r"^block\.(\d+)\.mlp\.mlp1_weight\.blocks$", r"layers.\1.mlp.experts.gate_up_proj.weight"),
    (r"^block\.(\d+)\.mlp\.mlp1_weight\.scales$", r"layers.\1.mlp.experts.gate_up_proj.scales"),
    (r"^block\.(\d+)\.mlp\.mlp1_bias$", r"layers.\1.mlp.experts.gate_up_proj.bias"),
    (r"^block\.(\d+)\.mlp\.mlp2_weight\.blocks$", r"layers.\1.mlp.experts.down_proj.weight"),
    (r"^block\.(\d+)\.mlp\.mlp2_weight\.scales$", r"layers.\1.mlp.experts.down_proj.scales"),
    (r"^block\.(\d+)\.mlp\.mlp2_bias$", r"layers.\1.mlp.experts.down_proj.bias"),
]


def _rename_hf(name: str) -> str:
    name = re.sub(r"^model\.", "", name)
    name = re.sub(r"experts\.(gate_up_proj|down_proj)_blocks$", r"experts.\1.weight", name)
    name = re.sub(r"experts\.(gate_up_proj|down_proj)_scales$", r"experts.\1.scales", name)
    return re.sub(r"experts\.(gate_up_proj|down_proj)_bias$", r"experts.\1.bias", name)


def _rename_original(name: str) -> str | None:
    for pattern, replacement in _ORIGINAL_RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def _is_packed_blocks(name: str, info: TensorInfo) -> bool:
    return info.dtype == "U8" and len(info.shape) == 4 and name.endswith(("_blocks", ".blocks"))


def map_tensors(layout: str, infos: dict[str, TensorInfo]):
    """Plan: our parameter name -> (expected source shape, a function of the loaded arrays).

    Returns (plan, origin) where origin names the checkpoint tensor(s) behind each parameter,
    so errors can say which tensor in which file is wrong.
    """
    plan, origin = {}, {}

    def add(ours, theirs, fn=None):
        plan[ours] = (theirs, fn)
        origin[ours] = theirs

    for name, info in infos.items():
        if layout == "hf" or layout == "mlx":
            ours = _rename_hf(name)
        else:
            ours = _rename_original(name)
            if ours is None:
                raise CheckpointError(f"{info.file}: unexpected tensor {name}")
        if _is_packed_blocks(name, info):
            # [E, out, in/32, 16] uint8 -> MLX mxfp4 [E, out, in/8] uint32, a free view
            add(ours, name, lambda t: t.view(mx.uint32).flatten(-2))
        else:
            add(ours, name)

    if layout == "mlx":
        _interleave_split_experts(plan, origin)
    if layout in ("hf", "mlx"):
        _fuse_qkv(plan, origin)
    return plan, origin


def _fuse_qkv(plan, origin):
    """q_proj, k_proj and v_proj (weight, bias; an mlx conversion's scales and biases too)
    become one qkv_proj, their rows stacked in that order (the original layout's attn.qkv)."""
    for name in [n for n in plan if ".self_attn.q_proj." in n]:
        parts = [name.replace(".q_proj.", f".{proj}.") for proj in ("q_proj", "k_proj", "v_proj")]
        for part in parts[1:]:
            if part not in plan:
                raise CheckpointError(f"tensor {origin[name]} has no matching {part.split('.')[-2]} tensor")
        target = name.replace(".q_proj.", ".qkv_proj.")
        plan[target] = (tuple(plan.pop(part) for part in parts), "concat")
        origin[target] = " + ".join(origin.pop(part) for part in parts)
    for name in [n for n in plan if re.search(r"\.self_attn\.[kv]_proj\.", n)]:  # (its q_proj is missing)
        raise CheckpointError(f"tensor {origin[name]} has no matching q_proj tensor")


def _interleave_split_experts(plan, origin):
    """mlx-lm splits gate_up rows into gate_proj (even) and up_proj (odd); put them back."""
    for name in [n for n in plan if ".experts.gate_proj." in n]:
        up_name = name.replace(".gate_proj.", ".up_proj.")
        if up_name not in plan:
            raise CheckpointError(f"tensor {origin[name]} has no matching up_proj tensor")
        gate_src, up_src = plan.pop(name), plan.pop(up_name)
        target = name.replace(".gate_proj.", ".gate_up_proj.")
        plan[target] = ((gate_src, up_src), "interleave")
        origin[target] = f"{origin.pop(name)} + {origin.pop(up_name)}"


# --------------------------------------------------------------------------- building the model
def _dense_quantization(infos_by_param: dict[str, tuple], config: ModelConfig) -> dict:
    """Per module path: (group_size, bits, mode) of affine/fp-quantized dense layers (mlx layout)."""
    quant = config.quantization or {}
    out = {}
    for name, (shape_w, shape_s, has_biases) in infos_by_param.items():
        path = name[: -len(".weight")]
        in_dims = config.hidden_size if not path.endswith("o_proj") else (
            config.num_attention_heads * config.head_dim)
        bits = shape_w[-1] * 32 // in_dims
        group_size = in_dims // shape_s[-1]
        source = path.replace(".qkv_proj", ".q_proj")  # the checkpoint's name for it
        override = quant.get(f"model.{source}") or quant.get(source) or {}
        mode = override.get("mode", quant.get("mode", "affine" if has_biases else "mxfp4"))
        out[path] = {"group_size": group_size, "bits": bits, "mode": mode}
    return out


def _expert_quantization(infos: dict[str, TensorInfo], layout: str, config: ModelConfig) -> dict:
    if layout != "mlx":
        return {}
    for name, info in infos.items():
        if ".experts.gate_proj.weight" in name or ".experts.down_proj.weight" in name:
            in_dims = config.hidden_size if "gate_proj" in name else config.intermediate_size
            scales = infos.get(name.replace(".weight", ".scales"))
            if scales is None:
                raise CheckpointError(f"{info.file}: {name} has no .scales tensor")
            has_biases = name.replace(".weight", ".biases") in infos
            bits = info.shape[-1] * 32 // in_dims
            group_size = in_dims // scales.shape[-1]
            mode = "affine" if has_biases else "mxfp4"
            return {"mode": mode, "group_size": group_size, "bits": bits}
    return {}


def build_model(config: ModelConfig, infos: dict[str, TensorInfo] | None = None,
                layout: str = "hf") -> Model:
    infos = infos or {}
    model = Model(config, **_expert_quantization(infos, layout, config))
    if layout == "mlx":
        dense = {}
        for name, info in infos.items():
            ours = _rename_hf(name)
            if ours.endswith(".weight") and ".experts." not in ours:
                scales = infos.get(name.replace(".weight", ".scales"))
                if scales is not None:
                    has_biases = name.replace(".weight", ".biases") in infos
                    fused = re.sub(r"\.self_attn\.[qkv]_proj\.", ".self_attn.qkv_proj.", ours)
                    quant = (tuple(info.shape[1:]), tuple(scales.shape[1:]), has_biases)
                    if fused != ours and dense.get(fused, quant) != quant:
                        raise CheckpointError(f"{info.file}: {name} is quantized unlike the other "
                                              "attention projections of its layer")
                    dense[fused] = quant
        if dense:
            params = _dense_quantization(dense, config)
            nn.quantize(model, class_predicate=lambda path, m: params.get(path, False))
    return model


def _check_against_model(model: Model, plan, infos, origin) -> None:
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    # Derived shapes of a plan entry, without loading anything.
    for ours in plan:
        if ours not in expected:
            src = origin[ours].split(" + ")[0]
            raise CheckpointError(f"{infos[src].file}: unexpected tensor {src}")
    for ours, param in expected.items():
        if ours not in plan:
            where = next(iter(infos.values())).file.parent if infos else "the checkpoint"
            raise CheckpointError(f"{where}: no tensor for {ours} in the checkpoint")
        source, fn = plan[ours]
        wanted = FLOAT_DTYPES if mx.issubdtype(param.dtype, mx.floating) else PACKED_DTYPES
        for src in _sources(source, fn):
            if infos[src].dtype not in wanted:
                raise CheckpointError(f"{infos[src].file}: tensor {src} has dtype {infos[src].dtype}"
                                      f", but {ours} needs one of {', '.join(wanted)}")
        shape = _planned_shape(source, fn, infos)
        if tuple(shape) != tuple(param.shape):
            src = origin[ours]
            file = infos[src.split(" + ")[0]].file
            raise CheckpointError(
                f"{file}: tensor {src} has shape {list(shape)} but a {list(param.shape)} "
                f"tensor is needed for {ours} by this config"
            )


def _planned_shape(source, fn, infos) -> tuple[int, ...]:
    if fn == "concat":
        shapes = [_planned_shape(src, f, infos) for src, f in source]
        if any(shape[1:] != shapes[0][1:] for shape in shapes):
            names = " + ".join(src for src, _ in source)
            raise CheckpointError(f"{infos[source[0][0]].file}: tensors {names} cannot be stacked: "
                                  f"shapes {[list(shape) for shape in shapes]}")
        return (sum(shape[0] for shape in shapes), *shapes[0][1:])
    if fn == "interleave":
        g = infos[source[0][0]].shape
        return (g[0], 2 * g[1], *g[2:])
    shape = infos[source].shape
    if fn is None:
        return shape
    try:
        return fn(mx.zeros(shape, dtype=_SAFETENSORS_DTYPES[infos[source].dtype])).shape
    except ValueError as e:  # e.g. packed blocks whose last dimension cannot be viewed as uint32
        raise CheckpointError(f"{infos[source].file}: tensor {source} {list(shape)} cannot be "
                              f"read as packed MXFP4 ({e})") from None


def _sources(source, fn) -> list[str]:
    """The checkpoint tensor names behind one plan entry."""
    return [src for src, _ in source] if fn in ("concat", "interleave") else [source]


def _materialize(plan, arrays, parts=None, infos=None):
    """The loaded (still lazy) arrays for each of our parameter names. With ``parts`` (one rank
    of a sharded model, distributed.shard_part by name), each rank's part only, named as in the
    sharded model: row ranges (experts, heads) are read from the files alone, the rest is cut
    from the lazily loaded tensor."""
    out = {}
    for ours, (source, fn) in plan.items():
        part = parts.get(ours) if parts is not None else None
        if parts is not None and part is None:
            continue  # another rank's
        if part is not None and part.rows is not None:
            out[part.name] = _read_plan_rows(source, fn, part.rows, infos)
            continue
        if fn == "interleave":
            array = _interleave(arrays[source[0][0]], arrays[source[1][0]])
        elif fn == "concat":
            array = mx.concatenate([arrays[src] if f is None else f(arrays[src]) for src, f in source])
        elif fn is None:
            array = arrays[source]
        else:
            array = fn(arrays[source])
        if part is None:
            out[ours] = array
        else:
            out[part.name] = part.take(array)
    return out


def _interleave(gate: mx.array, up: mx.array) -> mx.array:
    """[E, I, ...] gate and up rows -> [E, 2I, ...], gate rows even, up rows odd."""
    return mx.stack([gate, up], axis=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


def _read_plan_rows(source, fn, ranges, infos) -> mx.array:
    """Rows ``ranges`` (of the first axis) of one plan entry, reading only those bytes."""
    if fn == "interleave":  # the first axis is the experts', in both halves
        return _interleave(_read_rows(infos[source[0][0]], ranges), _read_rows(infos[source[1][0]], ranges))
    if fn == "concat":  # the stacked sources' rows, each range cut at the sources' boundaries
        pieces, start = [], 0
        for src, f in source:
            stop = start + infos[src].shape[0]
            inside = [(max(a, start) - start, min(b, stop) - start) for a, b in ranges if a < stop and b > start]
            if inside:
                rows = _read_rows(infos[src], inside)
                pieces.append(rows if f is None else f(rows))
            start = stop
        return mx.concatenate(pieces)
    rows = _read_rows(infos[source], ranges)
    return rows if fn is None else fn(rows)


def _read_rows(info: TensorInfo, ranges) -> mx.array:
    """Rows ``ranges`` of one checkpoint tensor, read from its file: nothing else is read."""
    dtype = _SAFETENSORS_DTYPES[info.dtype]
    row = math.prod(info.shape[1:]) * dtype.size
    data = bytearray()
    try:
        with open(info.file, "rb") as f:
            for a, b in ranges:
                f.seek(info.offset + a * row)
                data += f.read((b - a) * row)
    except OSError as e:
        raise CheckpointError(f"{info.file}: cannot be read ({e.strerror or e})") from None
    count = sum(b - a for a, b in ranges)
    if len(data) != count * row:
        raise CheckpointError(f"{info.file}: truncated while reading a tensor; the file is corrupt")
    return mx.array(memoryview(data)).view(dtype).reshape(count, *info.shape[1:])


def _cast(name: str, array: mx.array, dtype: mx.Dtype) -> mx.array:
    if not mx.issubdtype(array.dtype, mx.floating):
        return array  # packed weights, uint8 scales
    if name.endswith(".scales") or name.endswith(".biases"):
        return array  # affine quantization parameters keep the dtype they were made in
    return array.astype(dtype)


def quantize_dense(model: Model, bits: int, group_size: int = 64) -> None:
    """Affine-quantize attention, embedding and unembedding in place (lazily: nothing is
    materialized until evaluated). Experts are already MXFP4 and stay as they are. The router
    stays bf16: it is small (4.4 MB on 20b, 27 MB on 120b), it decides which experts run (4-bit
    weights turn near-ties of its logits into other experts), and the fused add + norm + router
    kernel reads it as it is (one launch a layer instead of five)."""
    if bits not in (4, 8):
        raise ValueError(f"dense bits must be 4 or 8, got {bits}")

    def dense(path: str, module: nn.Module) -> bool:
        return (isinstance(module, (nn.Linear, nn.Embedding)) and ".experts." not in path
                and not path.endswith("mlp.router"))

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=dense)


def read_config(directory: Path) -> ModelConfig:
    """The checkpoint's config.json (wherever its layout keeps it) with generation_config's stops."""
    config = ModelConfig.from_file(find_layout(directory)[1] / "config.json")
    return _merge_generation_config(config, directory)


def _stream_experts(model: Model, plan, infos: dict[str, TensorInfo], memory_plan: MemoryPlan, dtype) -> None:
    """Give every layer's MLP its experts in a shared pool of ``slots`` (``model.expert_pool``),
    read on demand from where the checkpoint holds them; a CheckpointError for checkpoints whose
    experts are not stored one MXFP4 tensor per projection (mlx-lm's split gate/up)."""
    # Imported here: it needs numpy, which `import gptoss_mlx` does not load.
    from .expert_pool import EXPERT_TENSORS, ExpertPool, ExpertSource, ExpertTensor

    unstreamable = _unstreamable_file(plan, infos, model.layers[0].mlp.experts.gate_up_proj.mode)
    if unstreamable is not None:  # a plan made without loading.stream_problem
        raise CheckpointError(f"{unstreamable}: experts can be streamed only from MXFP4 experts stored "
                              "with gate and up together (the published layouts); this checkpoint needs "
                              f"every expert on the GPU, {_resident_limit(memory_plan)}, or the original "
                              "checkpoint")
    tensors = {}
    for i in range(len(model.layers)):
        for name in EXPERT_TENSORS:
            info = infos[plan[f"layers.{i}.mlp.experts.{name}"][0]]
            tensors[i, name] = ExpertTensor(info.file, info.offset, _SAFETENSORS_DTYPES[info.dtype],
                                             info.shape[1:])
    model.expert_pool = ExpertPool(model.config, ExpertSource(tensors), memory_plan.expert_slots, dtype)
    for i, layer in enumerate(model.layers):  # its parameters leave the model: never loaded
        following = model.layers[i + 1] if i + 1 < len(model.layers) else None
        layer.mlp.experts = model.expert_pool.layer(i, following)


def _unstreamable_file(plan, infos: dict[str, TensorInfo], mode: str) -> Path | None:
    """The file of the first expert tensor that cannot be read into the pool as it is stored
    (mlx-lm's gate and up stored apart, or experts quantized other than MXFP4); None if every
    one can."""
    for name, (source, fn) in plan.items():
        if ".mlp.experts." in name and (mode != "mxfp4" or fn in ("concat", "interleave")):
            return infos[_sources(source, fn)[0]].file
    return None


def stream_problem(directory: Path, adapter: str | os.PathLike | None = None) -> str | None:
    """Why this checkpoint's experts (or, with ``adapter``, the adapted model's) cannot be
    streamed, as the memory plan says it (memory.choose_plan's ``unstreamable``), or None if they
    can: from the headers and the adapter's config alone, so that the plan names a limit that
    loads instead of a streamed one the loader then refuses."""
    if adapter is not None and "experts" in read_adapter_config(adapter).targets:
        return f"the adapter {adapter} trains the experts, which streamed experts do not reach"
    if (Path(directory) / FUSED_EXPERT_ADAPTER).is_dir():
        return (f"{directory} is a fused checkpoint whose experts keep their adapter "
                f"({FUSED_EXPERT_ADAPTER}/), which streamed experts do not reach (fuse again with "
                "--requantize-experts: the adapter merged into the experts, which then stream)")
    layout, weights_dir = find_layout(directory)
    if layout != "mlx":  # the published layouts: MXFP4 experts, gate and up together
        return None
    infos = _read_headers(weights_dir)
    mode = _expert_quantization(infos, layout, read_config(directory)).get("mode", "mxfp4")
    file = _unstreamable_file(map_tensors(layout, infos)[0], infos, mode)
    return None if file is None else (
        f"its experts cannot be streamed from {file} (only MXFP4 experts stored with gate and up "
        "together can be, as the original checkpoint stores them)")


def _resident_limit(memory_plan: MemoryPlan) -> str:
    """The memory limit ``memory_plan`` would need with every expert on the GPU, as a person
    gives it (memory.limit_or_more)."""
    missing = memory_plan.total_experts - memory_plan.expert_slots
    total = memory_plan.total + missing * memory_plan.experts / max(memory_plan.expert_slots, 1)
    return limit_or_more(round_up_gb(total))


def load_model(directory: str | Path, dtype: mx.Dtype = mx.bfloat16, dense_bits: int | None = None,
               memory_plan: MemoryPlan | None = None, group=None, sharding: str = "tensor") -> Model:
    """The model, with every weight resident (dense layers quantized to ``dense_bits``) or as
    ``memory_plan`` arranges it (its dense bits; experts streamed when it says so). With a
    distributed ``group`` of more than one rank, only this rank's part of it (``sharding``:
    tensor or pipeline, see gptoss_mlx/distributed.py), and only that part is read from the files."""
    directory = Path(directory)
    distributed = group is not None and group.size() > 1
    if memory_plan is not None and memory_plan.streamed and distributed:
        raise CheckpointError(f"{directory}: this rank's share of the model does not fit in "
                              f"{memory_plan.limit / 1e9:.1f} GB, and experts are not streamed "
                              "across machines: use more ranks, or machines with more memory")
    if memory_plan is not None:
        dense_bits = None if memory_plan.dense_bits == 16 else memory_plan.dense_bits
    layout, weights_dir = find_layout(directory)
    config = read_config(directory)
    infos = _read_headers(weights_dir)
    if config.quantization and not any(n.endswith(".scales") and ".experts." not in n for n in infos):
        # (the memory plan counted quantized dense layers, and --dense-bits was refused for them)
        raise CheckpointError(f"{weights_dir / 'config.json'}: its quantization says the dense layers are "
                              f"stored {config.quantization['bits']}-bit, but the weights hold them unquantized "
                              "(no .scales tensors): remove \"quantization\" from config.json")
    plan, origin = map_tensors(layout, infos)
    model = build_model(config, infos, layout)
    _check_against_model(model, plan, infos, origin)
    if memory_plan is not None and memory_plan.streamed:
        _stream_experts(model, plan, infos, memory_plan, dtype)
        plan = {k: v for k, v in plan.items() if ".mlp.experts." not in k}
    parts = None
    if distributed:
        model.shard(group, sharding)  # this rank's modules, not yet loaded
        model.weights_digest = tensors_digest(infos)
        model.config_digest = zlib.crc32(json.dumps(config.to_hf_dict(), sort_keys=True).encode()) & 0x7FFFFFFF
        parts = {name: shard_part(config, name, group.rank(), group.size(), sharding) for name in plan}

    arrays = {}
    for f in sorted({info.file for info in infos.values()}):
        try:
            arrays.update(mx.load(str(f)))  # lazy: read when evaluated
        except Exception as e:  # noqa: BLE001 - MLX raises plain exceptions for bad files
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    weights = {k: _cast(k, v, dtype) for k, v in _materialize(plan, arrays, parts, infos).items()}
    model.load_weights(list(weights.items()), strict=True)
    del arrays, weights
    if dense_bits and not config.quantization:
        quantize_dense(model, dense_bits)
    # Evaluate one layer at a time so the peak stays close to the final size.
    try:
        mx.eval(model.embed_tokens.parameters() if model.embed_tokens is not None else [])
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.norm.parameters() if model.norm is not None else [],
                model.lm_head.parameters() if model.lm_head is not None else [])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights_dir}: reading the weights failed ({e})") from None
    streamed = {} if model.expert_pool is None else model.expert_pool.source.samples(
        config.num_local_experts, FINITE_SAMPLE)  # the experts' biases and scales, from the files
    _check_finite_sample(model, origin, infos, streamed)
    model.eval()
    return model


def _read_headers(weights_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint's files, each in one file only, where the index says."""
    infos: dict[str, TensorInfo] = {}
    for f in _weight_files(weights_dir):
        for name, info in read_safetensors_header(f).items():
            if name in infos:
                raise CheckpointError(f"{f}: tensor {name} also appears in {infos[name].file}")
            infos[name] = info
    _check_weight_map(_weight_map(weights_dir), infos)
    return infos


def _check_weight_map(weight_map: dict[str, Path] | None, infos: dict[str, TensorInfo]) -> None:
    """The index must say where each tensor really is."""
    if weight_map is None:
        return
    for name, info in infos.items():
        if weight_map.get(name) != info.file:
            where = f"puts it in {weight_map[name].name}" if name in weight_map else "does not list it"
            raise CheckpointError(f"{info.file.parent / 'model.safetensors.index.json'}: {name} is "
                                  f"in {info.file.name}, but weight_map {where}")
    for name, file in weight_map.items():
        if name not in infos:
            raise CheckpointError(f"{file.parent / 'model.safetensors.index.json'}: weight_map "
                                  f"lists {name}, which {file.name} does not hold")


def _check_finite_sample(model: Model, origin: dict, infos: dict[str, TensorInfo],
                         streamed: dict[str, mx.array]) -> None:
    """NaN/Inf in a strided sample of every weight (FINITE_SAMPLE values each), and E8M0 scale
    255 (NaN) in MXFP4 scales; ``streamed``: samples of tensors the model does not hold (the
    streamed experts', ExpertSource.samples) by parameter name. One small evaluation over all
    samples together; only when it fails are the tensors looked at one by one, to name the culprit."""
    samples = {}
    for name, param in [*nn.utils.tree_flatten(model.parameters()), *streamed.items()]:
        flat = param.reshape(-1)
        sample = flat[:: max(1, flat.size // FINITE_SAMPLE)]
        if mx.issubdtype(param.dtype, mx.floating):
            samples[name] = sample.astype(mx.float32)
        elif param.dtype == mx.uint8 and name.endswith(".scales"):
            samples[name] = mx.where(sample == 255, float("nan"), 0.0)
    if not samples or mx.isfinite(mx.concatenate(list(samples.values()))).all().item():
        return
    for name, sample in samples.items():
        if not mx.isfinite(sample).all().item():
            src = origin.get(name) or origin.get(name.rsplit(".", 1)[0] + ".weight") or name
            first = src.split(" + ")[0]
            file = infos[first].file if first in infos else "checkpoint"
            raise CheckpointError(f"{file}: tensor {src} holds NaN or infinite values; the "
                                  "checkpoint is corrupt")


def _merge_generation_config(config: ModelConfig, directory: Path) -> ModelConfig:
    path = directory / "generation_config.json"
    if not os.path.lexists(path):
        return config
    data = read_json_file(path, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a JSON object, got {type(data).__name__}")
    if data.get("eos_token_id") is None:
        return config
    try:
        eos = token_ids(data["eos_token_id"], "eos_token_id")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config.replace(eos_token_ids=tuple(dict.fromkeys(list(config.eos_token_ids) + eos)))


def _parse_dtype(dtype) -> mx.Dtype:
    if dtype is None:
        return mx.bfloat16
    if isinstance(dtype, str):
        names = {"bfloat16": mx.bfloat16, "bf16": mx.bfloat16, "float32": mx.float32,
                 "fp32": mx.float32, "float16": mx.float16, "fp16": mx.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
        return names[dtype]
    if dtype not in (mx.bfloat16, mx.float32, mx.float16):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


NO_ADAPTER_ACROSS_MACHINES = ("adapters are not applied across machines yet: fuse the adapter into a "
                              "checkpoint (gptoss-mlx fuse --requantize-experts) and run that")


def load(path_or_repo: str | os.PathLike | None = None, dtype=None, dense_bits: int | None = None,
         memory_limit: float | str | None = None, max_context: int | None = None,
         group=None, sharding: str = "tensor", adapter: str | os.PathLike | None = None,
         memory_plan: MemoryPlan | None = None) -> tuple[Model, HarmonyEncoding]:
    """Load a gpt-oss checkpoint and its tokenizer, arranged by the memory plan.

    ``path_or_repo``: a local directory (Hugging Face, ``original/`` or mlx-lm layout) or a
    Hugging Face repo id (default ``openai/gpt-oss-20b``). ``dtype``: bfloat16 (default), float16
    or float32 for the non-expert weights and activations; experts stay MXFP4. ``memory_limit``
    (bytes, or a size such as "10GB"; default: the device's) and ``max_context`` (tokens of KV
    cache to plan for; default 32768) decide the arrangement (``memory.choose_plan``): everything
    resident, dense layers quantized to 8 or 4 bits, or experts streamed (``model.expert_pool``).
    ``dense_bits`` (16, 8 or 4) fixes the dense precision. Raises ``MemoryPlanError`` when not
    even the dense layers and one layer's experts fit. ``group`` (``mx.distributed``, more than
    one rank): this rank's part only, split by ``sharding`` (tensor or pipeline;
    gptoss_mlx/distributed.py), planned as this rank's share. ``adapter``: a LoRA adapter
    directory (``gptoss-mlx finetune``) applied to the model. A fused checkpoint's own expert
    adapter (``gptoss-mlx fuse``) is applied with it always. ``memory_plan``: a plan made
    already (``memory.choose_plan``), applied as it is instead of one made from
    ``memory_limit`` and ``dense_bits``: what a caller printed, or counted more in (a server's
    caches: its ``server``), is what loads.
    """
    dtype = _parse_dtype(dtype)
    if dense_bits is not None and (type(dense_bits) is not int or dense_bits not in DENSE_BITS):
        raise ValueError(f"dense_bits must be 16, 8 or 4, got {dense_bits!r}")
    if max_context is not None and (type(max_context) is not int or max_context < 1):
        raise ValueError(f"max_context must be a whole number of tokens, at least 1, got {max_context!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be {' or '.join(SHARDINGS)}, got {sharding!r}")
    if group is not None and not callable(getattr(group, "size", None)):
        raise TypeError(f"group must be an mx.distributed group (mx.distributed.init()), got {group!r:.60}")
    if adapter is not None and (not isinstance(adapter, (str, os.PathLike)) or not str(adapter).strip()):
        raise ValueError(f"adapter must be an adapter's directory or Hugging Face repo id, got {adapter!r:.60}")
    directory = resolve_checkpoint(path_or_repo)
    config = read_config(directory)
    if max_context is not None and max_context > config.max_position_embeddings:
        raise ValueError(f"max_context must be at most {config.max_position_embeddings} tokens (the model's "
                         f"max_position_embeddings), got {max_context}")
    context = min(max_context or DEFAULT_CONTEXT, config.max_position_embeddings)
    distributed = group is not None and group.size() > 1
    share = share_config(config, group.size(), sharding) if distributed else config
    if memory_plan is None:
        memory_plan = choose_plan(share, context, checkpoint_dense_bits(config, dense_bits), memory_limit,
                                  value_bytes=dtype.size, unstreamable=stream_problem(directory, adapter))
    else:
        _check_given_plan(memory_plan, share, config, dtype, dense_bits, memory_limit, context)
    if (directory / FUSED_EXPERT_ADAPTER).is_dir():
        if adapter is not None:
            raise CheckpointError(f"{directory} is a fused checkpoint with its own expert adapter; "
                                  "apply another adapter to the base model instead")
        if memory_plan.streamed:  # the adapter's updates would miss the experts read from the files
            raise CheckpointError(
                f"{directory} is a fused checkpoint whose experts keep their adapter beside them "
                f"({FUSED_EXPERT_ADAPTER}/), and in {limit_size(memory_plan.limit)} its experts would be "
                f"streamed, which adapters do not reach: it needs {_resident_limit(memory_plan)}, "
                "or fuse again with --requantize-experts "
                "(the adapter merged into the experts, which then stream)")
        if distributed:
            raise CheckpointError(f"{directory} is a fused checkpoint whose experts keep their adapter "
                                  f"beside them ({FUSED_EXPERT_ADAPTER}/), which is not applied across "
                                  "machines yet: fuse again with --requantize-experts (the adapter merged "
                                  "into the experts) and run that")
        adapter = directory / FUSED_EXPERT_ADAPTER
    if adapter is not None and distributed:
        raise CheckpointError(NO_ADAPTER_ACROSS_MACHINES)
    model = load_model(directory, dtype, memory_plan=memory_plan, group=group, sharding=sharding)
    model.planned_context = context  # what its memory was planned for: an Engine's default context
    if adapter is not None:
        load_adapter(model, adapter)
        note = adapter_base_note(adapter, directory)
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
    tokenizer = checkpoint_tokenizer(directory)
    if model.config.vocab_size < tokenizer.n_vocab:  # ids past the embedding give NaN logits
        raise CheckpointError(f"{directory}: vocab_size is {model.config.vocab_size} but the "
                              f"tokenizer has {tokenizer.n_vocab} ids; they must match")
    return model, tokenizer


def _check_given_plan(memory_plan: MemoryPlan, share: ModelConfig, config: ModelConfig, dtype: mx.Dtype,
                      dense_bits: int | None, memory_limit, context: int) -> None:
    """A ValueError unless ``memory_plan`` (load's) is a plan of this model (this rank's share of
    it) at this dtype and context, that fits its limit, with dense bits its checkpoint can be
    loaded at, given alone."""
    if not isinstance(memory_plan, MemoryPlan):
        raise TypeError(f"memory_plan must be a MemoryPlan (memory.choose_plan), got {type(memory_plan).__name__}")
    if dense_bits is not None or memory_limit is not None:
        raise ValueError("memory_plan already says the dense bits and the limit: give it alone, or "
                         "dense_bits and memory_limit without it")
    if not memory_plan.fits or not 0 < memory_plan.expert_slots <= memory_plan.total_experts:
        raise ValueError(f"memory_plan does not hold: {memory_plan.describe()} (make it with memory.choose_plan)")
    bits = memory_plan.dense_bits
    checkpoint_dense_bits(config, bits)  # a converted checkpoint's are its own
    if (memory_plan.total_experts != total_experts(share)
            or memory_plan.dense != dense_bytes(share, bits, dtype.size)):
        raise ValueError(f"memory_plan was made for another model or dtype ({memory_plan.total_experts} "
                         f"experts, dense layers {size(memory_plan.dense)}), not this one at {dtype}")
    if memory_plan.kv_cache != kv_cache_bytes(share, context, dtype.size):
        raise ValueError(f"memory_plan was made for another context than max_context={context} (its KV cache "
                         f"is {size(memory_plan.kv_cache)}): give the max_context it was made for")


def checkpoint_tokenizer(directory: Path) -> HarmonyEncoding:
    """The checkpoint's own tokenizer files (an ``original/`` directory's are one level up),
    else o200k_base.tiktoken from the environment or tiktoken's cache."""
    names = ("tokenizer.json", "tokenizer.json.gz", "o200k_base.tiktoken")
    candidates = [directory] + ([directory.parent] if directory.name == "original" else [])
    for candidate in candidates:
        if any(os.path.lexists(candidate / n) for n in names):
            return load_tokenizer(candidate)
    return load_tokenizer()


# ---- writing a checkpoint (models convert, fuse) ---------------------------------------------

SHARD_BYTES = 4 * 2**30
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "o200k_base.tiktoken", "generation_config.json", "chat_template.jinja")


def save_weights(out: Path, weights: dict[str, mx.array]) -> None:
    """Our parameter names, in safetensors shards of at most SHARD_BYTES with an index."""
    out.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for name, array in weights.items():
        if shards[-1] and size + array.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        try:
            mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
        except RuntimeError as e:  # MLX's "[write] Unable to write N bytes to file."
            raise OSError(f"{out / file}: {e} (is the disk full?)") from None
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(a.nbytes for a in weights.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

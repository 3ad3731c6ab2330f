"""Loading: the three checkpoint layouts, dtypes, and a clear error for every kind of bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import gptoss_mlx
from gptoss_mlx.loading import CheckpointError, find_layout, load_model
from gptoss_mlx.model import Model

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])


@pytest.fixture(scope="module")
def hf_logits(checkpoints):
    return np.array(load_model(checkpoints["hf"], mx.float32)(PROMPT))


@pytest.mark.parametrize("layout", ["original", "mlx"])
def test_all_layouts_give_the_same_logits(checkpoints, hf_logits, layout):
    assert find_layout(checkpoints[layout])[0] == layout
    logits = np.array(load_model(checkpoints[layout], mx.float32)(PROMPT))
    np.testing.assert_array_equal(logits, hf_logits)


def test_a_directory_given_as_a_string(checkpoints, hf_logits):
    """load_model takes what a user types, a str, as well as a Path."""
    logits = np.array(load_model(str(checkpoints["hf"]), mx.float32)(PROMPT))
    np.testing.assert_array_equal(logits, hf_logits)


def test_hf_directory_with_original_subfolder_prefers_hf(checkpoints):
    layout, where = find_layout(checkpoints["hf"])
    assert (layout, where) == ("hf", checkpoints["hf"])


def test_mlx_conversion_with_8bit_dense_layers(checkpoints, hf_logits):
    model = load_model(checkpoints["mlx_q8"], mx.float32)
    assert type(model.layers[0].self_attn.qkv_proj).__name__ == "QuantizedLinear"
    assert type(model.embed_tokens).__name__ == "QuantizedEmbedding"
    logits = np.array(model(PROMPT))
    assert np.corrcoef(logits.ravel(), hf_logits.ravel())[0, 1] > 0.99


def test_experts_stay_packed_mxfp4(checkpoints):
    model = load_model(checkpoints["hf"])
    experts = model.layers[0].mlp.experts
    assert experts.gate_up_proj.weight.dtype == mx.uint32
    assert experts.gate_up_proj.scales.dtype == mx.uint8
    assert experts.gate_up_proj.mode == "mxfp4"


def test_dtypes(checkpoints):
    bf16 = load_model(checkpoints["hf"])
    assert bf16.layers[0].self_attn.qkv_proj.weight.dtype == mx.bfloat16
    assert bf16.layers[0].input_layernorm.weight.dtype == mx.bfloat16  # bf16 values, fp32 math
    assert bf16(PROMPT).dtype == mx.bfloat16
    f32 = load_model(checkpoints["hf"], mx.float32)
    assert f32(PROMPT).dtype == mx.float32


def test_load_returns_model_and_tokenizer(tmp_path, tokenizer_json):
    from gptoss_mlx.testing import checkpoints as mtc
    ckpt = tmp_path / "ckpt"
    hf = mtc.write_hf(ckpt, mtc.TINY, seed=1, keep=True)  # the full vocabulary, as the tokenizer's
    mtc.write_original(ckpt / "original", mtc.TINY, hf)
    mtc.copy_tokenizer(ckpt, tokenizer_json)
    model, tokenizer = gptoss_mlx.load(ckpt)
    assert isinstance(model, Model)
    assert tokenizer.encode("hello world") == [24912, 2375]
    # the original/ layout finds the tokenizer one level up
    _, tokenizer2 = gptoss_mlx.load(ckpt / "original", dtype="float32")
    assert tokenizer2.n_vocab == 201088


def test_a_path_given_as_bytes_loads_and_another_type_is_named(tiny_checkpoint):
    """load(b'tiny') said that the existing directory b'tiny' did not exist."""
    model, _ = gptoss_mlx.load(bytes(tiny_checkpoint))
    assert isinstance(model, Model)
    with pytest.raises(TypeError, match="a model is a checkpoint directory or a Hugging Face repo id, got int 5"):
        gptoss_mlx.load(5)


def test_a_chat_on_a_loaded_model_keeps_to_the_context_its_memory_was_planned_for(tiny_checkpoint):
    """load(max_context=4096) planned the KV cache for 4,096 tokens, then Chat(model, tok) allowed
    131,072; and max_context past the model's limit was cut to it without a word."""
    from gptoss_mlx import load
    from gptoss_mlx.chat import Chat

    model, tok = load(tiny_checkpoint, max_context=4096)
    assert Chat(model, tok).engine.max_context == 4096 and Chat(model, tok, max_context=2048).engine.max_context == 2048
    assert Chat(load(tiny_checkpoint)[0], tok).engine.max_context == 32768  # the default plan's
    with pytest.raises(ValueError, match="max_context must be at most 131072 tokens"):
        load(tiny_checkpoint, max_context=10**9)


def test_an_empty_adapter_or_a_group_that_is_none_are_named(tiny_checkpoint):
    """load(adapter="") said ".: not an adapter directory" (it looked in the current folder), and
    load(group=5) raised AttributeError: 'int' object has no attribute 'size'."""
    import gptoss_mlx

    with pytest.raises(ValueError, match="adapter must be an adapter's directory or Hugging Face repo id, got ''"):
        gptoss_mlx.load(tiny_checkpoint, adapter="")
    with pytest.raises(TypeError, match="group must be an mx.distributed group"):
        gptoss_mlx.load(tiny_checkpoint, group=5)


def test_bad_dtype(checkpoints):
    with pytest.raises(ValueError, match="dtype"):
        gptoss_mlx.load(checkpoints["hf"], dtype="int8")


# ---------------------------------------------------------------- error cases
@pytest.fixture()
def broken(checkpoints, tmp_path):
    """A fresh writable copy of the tiny HF checkpoint."""
    dest = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hf"], dest, ignore=shutil.ignore_patterns("original"))
    return dest


def _rewrite(path, drop=(), change=None):
    tensors = mx.load(str(path))
    for name in drop:
        del tensors[name]
    if change:
        tensors.update(change)
    mx.save_safetensors(str(path), tensors)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such directory"):
        gptoss_mlx.load("/nonexistent/gpt-oss")


def test_an_empty_name_is_not_the_default_model():
    for name in ("", "   "):
        with pytest.raises(CheckpointError, match="the model name is empty"):
            gptoss_mlx.load(name)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        gptoss_mlx.load(tmp_path)


def test_missing_tensor(broken):
    _rewrite(broken / "model.safetensors", drop=["model.layers.2.self_attn.sinks"])
    with pytest.raises(CheckpointError, match="layers.2.self_attn.sinks"):
        load_model(broken)


def test_misshapen_tensor_names_file_and_tensor(broken):
    _rewrite(broken / "model.safetensors",
             change={"model.layers.1.self_attn.o_proj.bias": mx.zeros((7,), mx.bfloat16)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*o_proj\.bias.*\[7\]"):
        load_model(broken)


def test_misshapen_attention_projection_is_named(broken):
    """q/k/v are stacked into one qkv_proj at load: a wrong one still names its tensor."""
    _rewrite(broken / "model.safetensors",
             change={"model.layers.1.self_attn.k_proj.weight": mx.zeros((32, 60), mx.bfloat16)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*cannot be stacked"):
        load_model(broken)


def test_missing_attention_projection(broken):
    _rewrite(broken / "model.safetensors", drop=["model.layers.3.self_attn.v_proj.bias"])
    with pytest.raises(CheckpointError, match=r"layers\.3\.self_attn\.q_proj\.bias has no matching v_proj"):
        load_model(broken)


def test_a_missing_query_projection_is_not_called_an_unexpected_key_projection(broken):
    _rewrite(broken / "model.safetensors", drop=["model.layers.2.self_attn.q_proj.weight"])
    with pytest.raises(CheckpointError, match=r"layers\.2\.self_attn\.k_proj\.weight has no matching q_proj"):
        load_model(broken)


def test_unexpected_tensor(broken):
    _rewrite(broken / "model.safetensors", change={"model.layers.0.mystery": mx.zeros((3,))})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.mystery"):
        load_model(broken)


def test_corrupt_header(broken):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_model(broken)


def test_truncated_file(broken):
    path = broken / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(broken)


def test_missing_shard(broken):
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: missing"):
        load_model(broken)


def test_config_that_does_not_match_weights(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_local_experts"] = 16
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="router"):
        load_model(broken)


def test_invalid_config(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(gptoss_mlx.ConfigError, match="config.json: not valid JSON"):
        load_model(broken)


def test_offline_repo_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not downloaded and HF_HUB_OFFLINE is set.*models pull"):
        gptoss_mlx.load("openai/gpt-oss-20b")


@pytest.mark.parametrize("where", ["config", "snapshot"])
def test_without_a_network_a_model_not_downloaded_is_said_at_once(tmp_path, monkeypatch, where):
    """Offline without HF_HUB_OFFLINE, `models pull` (and chat) of a repo not in the cache waited
    23 s through huggingface-hub's five retries and their warnings before its one line: the
    Hub's host not resolving is enough to know."""
    import socket

    import huggingface_hub.utils._http as hub_http

    from gptoss_mlx import hub, loading

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", *loading.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)

    def no_network(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def asked(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(hub_http, "get_session", asked)
    fetch = hub.fetch_config if where == "config" else loading.download
    with pytest.raises(CheckpointError, match="someone/gpt-oss-x is not downloaded and the Hub cannot be reached"):
        fetch("someone/gpt-oss-x")


def test_a_path_in_the_home_of_no_user_is_the_callers_error_naming_it():
    """``~nosuchuser/...`` made pathlib raise a bare RuntimeError: tracebacks from `/save`,
    `--json-schema`, `--functions`, `--adapter` and the library's loaders (helper-155)."""
    from gptoss_mlx.chat_file import write_text_atomic
    from gptoss_mlx.finetune import DataError, load_data
    from gptoss_mlx.lora import AdapterError, read_adapter_config
    from gptoss_mlx.tools.functions import ToolError, load_functions

    from pathlib import Path

    from gptoss_mlx.cli import build_parser
    from gptoss_mlx.files import expand_user

    # only the path's own start is a home: ./~x is a folder here (pathlib read it as user x's, helper-158)
    assert expand_user("./~x/a.json") == Path.cwd() / "~x" / "a.json" and expand_user("~/a") == Path.home() / "a"
    # made absolute: a later expansion (a Path of ./~root is ~root) wrote into root's home (helper-159)
    assert expand_user(expand_user("./~root/a.json")) == Path.cwd() / "~root" / "a.json"
    assert expand_user("sub/~x") == Path("sub/~x")
    # and an output folder is expanded as every other path ('~/out' made a folder named ~ here)
    args = build_parser().parse_args(["models", "convert", "src", "~/out36", "--dense-bits", "8"])
    assert args.out == Path.home() / "out36"
    where = "~nosuchuser-36/x"
    said = f"{where}: there is no user 'nosuchuser-36' on this machine"
    for call, error in [(lambda: load_functions(where), ToolError), (lambda: read_adapter_config(where), AdapterError),
                        (lambda: load_data(where, None, 16), DataError), (lambda: write_text_atomic(where, "x"), OSError),
                        (lambda: gptoss_mlx.load(where), CheckpointError)]:
        with pytest.raises(error, match=said):
            call()


def test_a_folder_variable_in_the_home_of_no_user_is_one_line(monkeypatch, capsys):
    """GPTOSS_MLX_DATA_DIR or HF_HUB_CACHE of ~nosuchuser/...: a traceback (a re-attack's, helper-158)."""
    from gptoss_mlx.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", "~nosuchuser-36/hf")
    assert main(["models", "list"]) == 1
    assert capsys.readouterr().err == ("gptoss-mlx: error: HF_HUB_CACHE=~nosuchuser-36/hf: there is no user "
                                       "'nosuchuser-36' on this machine\n")
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", "~nosuchuser-36/data")
    from gptoss_mlx.store import data_dir

    with pytest.raises(FileNotFoundError, match="GPTOSS_MLX_DATA_DIR=~nosuchuser-36/data: there is no user"):
        data_dir()

"""config.json in all its published forms, presets, YaRN numbers, and clear errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_mlx.config import FULL, GPT_OSS_20B, GPT_OSS_120B, SLIDING, ConfigError, ModelConfig
from gptoss_mlx.model import yarn_parameters

# openai/gpt-oss-120b config.json as published (gpt-oss.md 1.1)
HF_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn"],
                            "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {
        "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0",
    "use_cache": True, "vocab_size": 201088,
}
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
    "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0,
}


def test_published_hf_config_equals_preset():
    assert ModelConfig.from_dict(HF_120B) == GPT_OSS_120B


def test_original_config_equals_preset():
    assert ModelConfig.from_dict(ORIGINAL_20B) == GPT_OSS_20B
    assert GPT_OSS_20B.layer_types[:3] == (SLIDING, FULL, SLIDING)


def test_rope_parameters_form():
    raw = dict(HF_120B)
    rope = dict(raw.pop("rope_scaling"), rope_theta=raw.pop("rope_theta"))
    assert ModelConfig.from_dict({**raw, "rope_parameters": rope}) == GPT_OSS_120B


def test_round_trips():
    for cfg in (GPT_OSS_20B, GPT_OSS_120B):
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
        assert ModelConfig.from_dict(cfg.to_original_dict()) == cfg


def test_yarn_matches_reference_numbers():
    inv_freq, concentration = yarn_parameters(GPT_OSS_20B)
    assert concentration == pytest.approx(1.3465736, rel=1e-7)
    expected = {0: 1.0, 8: 5.081327e-02, 9: 3.170570e-02, 17: 1.293187e-04,
                18: 3.830881e-05, 31: 3.023511e-07}
    for i, value in expected.items():
        assert inv_freq[i] == pytest.approx(value, rel=1e-6), i


def test_truncate_true_rounds_the_correction_range():
    raw = json.loads(json.dumps(HF_120B))
    raw["rope_scaling"]["truncate"] = True
    inv_freq, _ = yarn_parameters(ModelConfig.from_dict(raw))
    assert inv_freq[9] != pytest.approx(yarn_parameters(GPT_OSS_120B)[0][9], rel=1e-3)


def test_eos_ids_always_include_return_and_call():
    assert {200002, 199999, 200012} <= set(ModelConfig.from_dict(HF_120B).eos_token_ids)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_experts": 64}, "contradictory values for num_local_experts"),
        ({"layer_types": ["sliding_attention"] * 35}, "layer_types has 35 entries"),
        ({"layer_types": ["local"] * 36}, "unknown layer_types"),
        ({"num_experts_per_tok": 129, "experts_per_token": 129}, "exceeds num_local_experts"),
        ({"num_key_value_heads": 7}, "not a multiple"),
        ({"hidden_size": 2881}, "multiple of 32"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "unsupported rope type"),
        ({"tie_word_embeddings": True}, "untied"),
        ({"vocab_size": -1}, "vocab_size must be a positive integer"),
        ({"num_hidden_layers": "36"}, "num_hidden_layers must be a positive integer"),
        ({"hidden_size": 10**12}, "hidden_size must be at most 16,777,216, got 1,000,000,000,000"),  # a traceback
        ({"max_position_embeddings": 2**40}, "max_position_embeddings must be at most 2,147,483,647"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 16.0}}, "disagree"),
        ({"initial_context_length": 8192}, "contradictory values"),
        ({"rope_scaling": [32.0]}, "rope_scaling must be a JSON object"),
        ({"layer_types": 36}, "layer_types must be a list of strings"),
        ({"eos_token_id": 200002.0}, "eos_token_id must be a token id"),
        ({"eos_token_id": True}, "eos_token_id must be a token id"),
        ({"rope_theta": float("inf")}, "rope_theta must be a positive finite number"),
        # a whole number of 400 digits is valid JSON: an OverflowError's traceback (helper-148)
        ({"rope_theta": 10**400}, "rope_theta must be a finite number, got a number of 401 digits"),
        ({"rms_norm_eps": 10**400}, "rms_norm_eps must be a positive finite number, got a number of 401 digits"),
        ({"hidden_size": 10**400}, "hidden_size must be at most 16,777,216, got a number of 401 digits"),
        ({"rope_scaling": {**HF_120B["rope_scaling"], "factor": "32"}}, "rope_scaling.factor must be a number"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quant_method is 'gptq'"),
        # (a traceback from the memory plan, then a negative plan: helper-131)
        ({"quantization": {"group_size": 64, "bits": "abc"}}, "quantization.bits must be an integer, got 'abc'"),
        ({"quantization": {"group_size": 64, "bits": -40}}, r"quantization.bits must be one of 2, 3, 4, 5, 6, 8"),
        ({"quantization": {"group_size": 0, "bits": 4}}, "quantization.group_size must be positive"),
        ({"sliding_window": 2**24}, r"sliding_window \(16,777,216\) is longer than max_position_embeddings"),
        ({"rope_scaling": {**HF_120B["rope_scaling"], "beta_slow": 1e-9}}, r"YaRN correction range \[8.093, 73.038\].*head_dim/2 - 1 = 31"),
        ({"rope_scaling": {**HF_120B["rope_scaling"], "beta_fast": 1e9}}, r"YaRN correction range \[-"),
    ],
)
def test_bad_configs_give_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**HF_120B, **change})


def test_from_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_120B, "model_type": "bert"}))
    with pytest.raises(ConfigError, match=f"{path}: model_type"):
        ModelConfig.from_file(path)


def test_a_misspelled_required_field_is_named():
    raw = {k: v for k, v in HF_120B.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="required field hidden_size is missing .*'hiden_size'"):
        ModelConfig.from_dict({**raw, "hiden_size": 2880})
    with pytest.raises(ConfigError, match="required field hidden_size is missing$"):
        ModelConfig.from_dict(raw)


def test_yarn_range_of_the_published_config_is_accepted():
    """The reference asserts 0 < low < high < head_dim/2 - 1; gpt-oss sits well inside."""
    from gptoss_mlx.config import yarn_correction_range
    low, high = yarn_correction_range(GPT_OSS_120B)
    assert (low, high) == (pytest.approx(8.092779), pytest.approx(17.398025))


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"), ("{", "not valid JSON"), ("[" * 50_000, r"not valid JSON \(nested too deeply\)"),
], ids=["empty", "not-json", "deep"])
def test_unreadable_config_files(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        ModelConfig.from_file(path)


def test_a_fifo_config_is_refused_without_blocking(tmp_path):
    import os
    path = tmp_path / "config.json"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match="is a FIFO"):
        ModelConfig.from_file(path)


def test_a_number_with_thousands_of_digits_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(a number of more than"):
        ModelConfig.from_file(path)


def test_a_huge_config_is_refused_unread(tmp_path, monkeypatch):
    import gptoss_mlx.files as files
    path = tmp_path / "config.json"
    path.write_text("{}" + " " * 100)
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 64)
    with pytest.raises(ConfigError, match="102 bytes is too large for a JSON file"):
        ModelConfig.from_file(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(HF_120B) + ["rope_parameters", "num_experts", "rope_ntk_beta",
                                                          "initial_context_length", "quantization"]),
                       JSON_VALUES, min_size=1, max_size=4),
       st.sampled_from(["replace", "into_rope_scaling"]))
def test_any_field_of_any_type_gives_a_config_or_a_config_error(changes, where):
    raw = json.loads(json.dumps(HF_120B))
    if where == "replace":
        raw.update(changes)
    else:
        raw["rope_scaling"].update(changes)
    try:
        ModelConfig.from_dict(raw)
    except ConfigError as e:
        assert "\n" not in str(e)

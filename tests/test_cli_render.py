"""`gptoss-mlx render`: the exact prompt for a conversation, as text or token ids."""

import json

import pytest

from gptoss_mlx.cli import main

CONVERSATION = {
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}],
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "reasoning": "Use the tool.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": -3}"},
    ],
}


@pytest.fixture()
def conv_file(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(CONVERSATION))
    return path


def test_render_text(conv_file, capsys):
    assert main(["render", str(conv_file), "--date", "2025-08-05", "-e", "high"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<|start|>system<|message|>You are ChatGPT, a large language model "
                          "trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: 2025-08-05"
                          "\n\nReasoning: high\n\n")
    assert "type get_weather = (_: {\ncity: string,\n}) => any;" in out
    assert out.rstrip("\n").endswith(
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
        '<|message|>{"city":"Oslo"}<|call|><|start|>functions.get_weather to=assistant'
        '<|channel|>commentary<|message|>{"temp": -3}<|end|><|start|>assistant')


def test_render_tokens_from_stdin(conv_file, capsys, monkeypatch, tokenizer_json, tmp_path):
    import io
    import shutil
    ckpt = tmp_path / "tok"
    ckpt.mkdir()
    shutil.copy(tokenizer_json, ckpt / "tokenizer.json.gz")
    monkeypatch.setattr("sys.stdin", io.StringIO(conv_file.read_text()))
    assert main(["render", "-", "--tokens", "--date", "2025-08-05", "--model", str(ckpt)]) == 0
    ids = list(map(int, capsys.readouterr().out.split()))
    assert ids[:3] == [200006, 17360, 200008] and ids[-2:] == [200006, 173781]
    assert ids.count(200012) == 1  # one <|call|>


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"messages": [{"role": "wizard"}]}', "unknown role"),
])
def test_render_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["render", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_render_missing_file(capsys):
    assert main(["render", "/nonexistent.json"]) == 2
    assert "/nonexistent.json" in capsys.readouterr().err

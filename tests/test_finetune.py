"""LoRA fine-tuning (gptoss_mlx/finetune.py, lora.py, cli/finetune.py): the loss mask against the
rendering, bad data, the tiny model learning eight conversations, resuming, adapters in chat and
serve, and fusing."""

from __future__ import annotations

import json
import os
import re
import threading
from types import SimpleNamespace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from gptoss_mlx import finetune as ft
from gptoss_mlx import harmony
from gptoss_mlx.chat import AnswerDelta, Chat
from gptoss_mlx.cli import build_parser, common, main
from gptoss_mlx.generate import SamplingParams
from gptoss_mlx.tokenizer import SPECIAL_TOKENS as ID
from gptoss_mlx.loading import CheckpointError, load
from gptoss_mlx.memory import MemoryPlanError
from gptoss_mlx.lora import (
    ADAPTER_WEIGHTS, FUSED_EXPERT_ADAPTER, AdapterError, LoRAConfig, LoRALinear, LoRASwitchLinear, apply_lora,
    save_adapter,
)
from gptoss_mlx.testing import checkpoints as mtc
from gptoss_mlx.tokenizer import load_tokenizer

DATE = "2025-08-05"
STOPS = (ID["<|call|>"], ID["<|return|>"])
CAPITALS = [("France", "Paris"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Spain", "Madrid"), ("Cuba", "Havana")]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}
# Two turns; the second calls a tool and answers: history reasoning, tool call, tool result.
WITH_TOOLS = {"date": DATE, "tools": [WEATHER], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "reasoning": "old thought", "content": "Hello!"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning": "need the tool", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\":20}"},
    {"role": "assistant", "thinking": "it is 20", "content": "It is 20 degrees."}]}


def capitals_line(country, city):
    return {"date": DATE, "messages": [{"role": "user", "content": country},
                                       {"role": "assistant", "content": city}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


@pytest.fixture(scope="module")
def sharp(tokenizer_json, tmp_path_factory):
    """The tiny random checkpoint with its unembedding scaled 4x: logits spread like a trained
    model's (std ~4 rather than ~1), so that one token of 201k can become likely at all."""
    ckpt = tmp_path_factory.mktemp("sharp") / "tiny"
    mtc.write_hf(ckpt, mtc.TINY, seed=3)
    weights, metadata = mx.load(str(ckpt / "model.safetensors"), return_metadata=True)
    weights["lm_head.weight"] = (weights["lm_head.weight"].astype(mx.float32) * 4).astype(mx.bfloat16)
    mx.save_safetensors(str(ckpt / "model.safetensors"), weights, metadata=metadata)
    mtc.copy_tokenizer(ckpt, tokenizer_json)
    return ckpt


# ----------------------------------------------------------------------- the mask and the data
def test_mask_covers_exactly_what_the_model_samples_at_inference(tok):
    messages = ft.conversation_messages(WITH_TOOLS, "x:1")
    tokens, mask = ft.render_for_training(messages, tok)
    expected = [False] * len(tokens)
    points = ft.prompt_points(messages)
    assert len(points) == 2  # the turn's start, and after the tool result
    for i in points:
        # The prompt at inference (Chat's rendering: earlier reasoning dropped) is a prefix...
        prompt = harmony.segments_to_tokens(harmony.render_conversation(messages[:i]), tok)
        assert tokens[:len(prompt)] == prompt
        # ... and the model samples from there up to the token that stops sampling.
        end = next(j for j in range(len(prompt), len(tokens)) if tokens[j] in STOPS)
        expected[len(prompt):end + 1] = [True] * (end + 1 - len(prompt))
    assert mask == expected
    assert tokens[-1] == ID["<|return|>"] and tokens.count(ID["<|return|>"]) == 1
    text = tok.decode(tokens)
    assert "old thought" not in text and "need the tool" in text and "it is 20" in text  # thinking


def test_bad_lines_name_the_line_and_the_field(tok, tmp_path):
    good = capitals_line("France", "Paris")
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (json.dumps({"messages": [{"role": "assistant", "thinking": 3, "content": "x"}]}),
         "messages[0].thinking must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "nothing to train on"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}),
         "the last assistant message has no answer"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "reasoning": "hm", "content": None}]}),
         "the last assistant message has no answer"),
        (json.dumps({"messages": [{"role": "wizard"}]}), "messages[0].role"),
        (json.dumps([1, 2]), "expected a JSON object"),
        # a tester's: one of the two was trained, the other dropped without a word
        (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "reasoning": "R1", "thinking": "T2", "content": "x"}]}),
         "messages[1] has both 'reasoning' and 'thinking'"),
        # ... and calls the model would learn to make: to an undeclared function, with broken arguments
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                  "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "get", "arguments": "{}"}}]}]}),
         "the trained reply's call to functions.get names a function the line's tools do not declare (none)"),
        (json.dumps({"tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}],
                     "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                  "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "get", "arguments": "{not json"}}]}]}),
         "the trained reply's call to functions.get has arguments that are not JSON"),
    ]
    for line, problem in cases:
        path = tmp_path / "train.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(ft.DataError) as e:
            ft.load_data(path, tok, 512)
        assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value), str(e.value)


def test_long_conversations_are_truncated_or_skipped_and_reported(tok, tmp_path):
    long = capitals_line("France", "Paris " * 200)
    path = write_jsonl(tmp_path / "train.jsonl", [capitals_line("Peru", "Lima"), long])
    short = len(ft.load_data(path, tok, 4096)[0][0].tokens)
    examples, report = ft.load_data(path, tok, short + 20)
    assert [len(e.tokens) for e in examples] == [short, short + 20]
    assert report.truncated == [2] and "1 conversation(s) longer than" in report.lines(short + 20)[0]
    examples, report = ft.load_data(path, tok, short + 20, long="skip")
    assert len(examples) == 1 and report.skipped == [2]
    assert report.lines(short + 20)[0].endswith("tokens skipped (line 2)")  # as asked: --long skip
    # cut, a conversation keeping none of its answer is skipped too: the line said only "skipped"
    late = capitals_line("Peru " * 200, "Lima")
    path = write_jsonl(tmp_path / "late.jsonl", [capitals_line("Peru", "Lima"), late])
    examples, report = ft.load_data(path, tok, short + 20)
    assert len(examples) == 1 and report.skipped == [2]
    assert report.lines(short + 20)[0].endswith(
        "skipped (line 2): cut to that length, none would keep any of the answer it trains on (raise "
        "--max-seq-len to train on them)")
    with pytest.raises(ft.DataError, match="all 2 are longer than --max-seq-len 20 tokens and were skipped"):
        ft.load_data(path, tok, 20, long="skip")
    # truncated to nothing of their answers (it said "were skipped", not why), and a --valid file
    with pytest.raises(ft.DataError, match="no conversations to validate on: all 2 .* cut to that length "
                                           "none keeps any of the answer it trains on: raise --max-seq-len"):
        ft.load_data(path, tok, 20, purpose="validate on")


def test_small_things_from_a_testers_list(sharp, tok, tmp_path):
    """--val-batches N evaluated the N batches of the shortest conversations (the loss was
    biased); --targets router,router was stored twice; --adapter FILE said "no such adapter
    directory"; --resume with only the optimizer missing said both were."""
    from gptoss_mlx.cli.finetune import targets_list
    from gptoss_mlx.lora import read_adapter_config

    model, _ = load(sharp)
    rows = [capitals_line(country, city * n) for n, (country, city) in enumerate(CAPITALS[:5], 1)]
    examples, _ = ft.load_data(write_jsonl(tmp_path / "v.jsonl", rows), tok, 512)
    ends = sorted(examples, key=lambda e: len(e.tokens))
    assert ft.evaluate(model, examples, 1, max_batches=2) == pytest.approx(
        ft.evaluate(model, [ends[0], ends[-1]], 1), rel=1e-6)  # the shortest and the longest
    assert targets_list("router,attention,router") == ("router", "attention")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file, not an adapter directory"):
        read_adapter_config(tmp_path / "file")
    out = tmp_path / "out"
    list(ft.train(model, str(sharp), examples[:1], ft.Settings(rank=2, iters=1), out))
    (out / ft.OPTIMIZER_FILE).unlink()
    with pytest.raises(ft.DataError, match=r"nothing to resume \(no optimizer.safetensors\)"):
        ft.read_state(out)


def test_a_byte_order_mark_before_the_first_line_is_skipped(tok, tmp_path):
    path = tmp_path / "train.jsonl"  # as Notepad saves "UTF-8 with BOM"
    line = b"\xef\xbb\xbf" + json.dumps(capitals_line("Peru", "Lima")).encode() + b"\n"
    path.write_bytes(line)
    assert len(ft.load_data(path, tok, 512)[0]) == 1
    path.write_bytes(line * 2)  # two such files put together (cat a.jsonl b.jsonl)
    assert len(ft.load_data(path, tok, 512)[0]) == 2
    path.write_text("\n\n")
    with pytest.raises(ft.DataError, match="no conversations to train on [(]the file has none[)]"):
        ft.load_data(path, tok, 512)


def test_cli_reports_a_bad_line_in_one_message(sharp, tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n")
    assert main(["finetune", "--model", str(sharp), "--data", str(path),
                 "--adapter-path", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert f"{path}:1: messages[0].content must be" in err and "Traceback" not in err
    assert "Loading" not in out  # the data is read before the model: a typo costs no load


def test_fine_tuning_a_model_whose_experts_stream_is_refused_in_one_message(sharp, tok, tmp_path, monkeypatch,
                                                                           capsys):
    """On a machine where the plan streams the experts (a simulated small GPU), training would
    compute gradients with experts that later layers replaced in the pool: refused, by the
    library and by the CLI, naming why."""
    from gptoss_mlx.memory import DEVICE_MEMORY_ENV

    data = write_jsonl(tmp_path / "capitals.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    model, _ = load(sharp, memory_limit="1.02307GB", dense_bits=4)
    assert model.expert_pool is not None
    examples, _ = ft.load_data(data, tok, 512)
    with pytest.raises(AdapterError, match="fine-tuning needs every expert on the GPU"):
        next(ft.train(model, str(sharp), examples, SETTINGS, tmp_path / "out"))
    with pytest.raises(AdapterError, match="fine-tuning needs every expert on the GPU"):
        ft.make_step(model, optim.Adam(learning_rate=1e-3))
    # the CLI plans for training: every expert resident, sequences of --max-seq-len tokens (not a
    # chat's 32768-token KV cache, which streamed the experts at this limit, then refused them)
    def args(out):
        return ["finetune", "--model", str(sharp), "--data", str(data), "--dense-bits", "4", "--targets",
                "attention", "--adapter-path", str(tmp_path / out), "--iters", "1", "--max-seq-len", "256"]
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1.02307GB")
    assert main(args("out")) == 0, capsys.readouterr().err
    # where that does not fit, the error names the smallest limit that does (a traceback below the
    # streamed plan's smallest limit)
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "0.2GB")
    assert main(args("out2")) == 2
    err = capsys.readouterr().err
    assert "fine-tuning trains with every expert, so every expert must be on the GPU" in err, err
    assert "Traceback" not in err and "Loading" not in err
    smallest = re.search(r"set GPTOSS_MLX_DEVICE_MEMORY to ([\d.]+GB) or more", err)[1]
    monkeypatch.setenv(DEVICE_MEMORY_ENV, smallest)  # what it names is enough
    assert main(args("out3")) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------ learning
# Batches of four (each epoch of two steps visits all eight examples; twelve steps learn all eight
# on the CPU in about 25 s, sixteen took 30 with nothing more to show): a step costs half of one
# batch of eight on the CPU (MLX's MXFP4 gather there is slow) and all eight are still learned.
SETTINGS = ft.Settings(rank=16, alpha=32, targets=("attention", "experts"), iters=12, batch_size=4,
                       learning_rate=3e-3, steps_per_report=1, steps_per_eval=12, save_every=100)


@pytest.fixture(scope="module")
def trained(sharp, tok, tmp_path_factory):
    """The tiny model trained on eight conversations (validation = the same eight)."""
    out = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(out.parent / "capitals.jsonl", [capitals_line(*c) for c in CAPITALS])
    examples, _ = ft.load_data(data, tok, 512)
    model, _ = load(sharp)
    events = list(ft.train(model, str(sharp), examples, SETTINGS, out, valid_set=examples))
    return model, out, events


def greedy_answer(model, tok, question):
    chat = Chat(model, tok, date=DATE, sampling=SamplingParams(temperature=0, max_tokens=12))
    return "".join(e.text for e in chat.send(question) if isinstance(e, AnswerDelta))


def test_the_tiny_model_learns_eight_conversations(trained, sharp, tok):
    model, out, events = trained
    validation = [e.loss for e in events if isinstance(e, ft.Validation)]
    assert validation[-1] <= 0.1 * validation[0], validation
    assert [e.step for e in events if isinstance(e, ft.Saved)] == [SETTINGS.iters]
    base, _ = load(sharp)
    assert greedy_answer(model, tok, "France") == "Paris"
    assert greedy_answer(base, tok, "France") != "Paris"
    # Saved and loaded again: the same model.
    again, _ = load(sharp, adapter=out)
    prompt = mx.array([tok.encode("France Peru Japan")])
    assert mx.allclose(again(prompt), model(prompt)).item()


def test_an_adapter_loads_in_chat_generate_and_serve(trained, sharp, tok, monkeypatch, capsys):
    model, out, _ = trained
    for command in ("chat", "serve", "generate -p x", "tui"):
        args = build_parser().parse_args([*command.split(), "--model", str(sharp), "--adapter", str(out)])
        chat = common.load_chat(args)
        adapted = [m for _, m in chat.engine.model.named_modules() if isinstance(m, LoRASwitchLinear)]
        assert len(adapted) == 2 * mtc.TINY.num_hidden_layers, command
    assert main(["generate", "--model", str(sharp), "--adapter", str(out), "--temperature", "0",
                 "--max-tokens", "12", "-p", "France"]) == 0
    assert capsys.readouterr().out.strip() != ""  # a reply; exactness: test above
    assert main(["generate", "--model", str(sharp), "--adapter", str(out / "missing"), "-p", "x"]) == 2
    assert "no such adapter directory" in capsys.readouterr().err


def test_an_adapter_made_for_other_weights_is_noted_where_it_is_applied(trained, sharp, tokenizer_json, tmp_path,
                                                                         capsys):
    """A tester fused an adapter into another checkpoint of the same shape (and ran it with
    --adapter) without a word, while `finetune --resume` on that pair refused."""
    import shutil

    from gptoss_mlx.loading import checkpoint_digest

    _, out, _ = trained
    adapter = tmp_path / "adapter"
    shutil.copytree(out, adapter)
    state = json.loads((adapter / ft.TRAINING_STATE).read_text())
    (adapter / ft.TRAINING_STATE).write_text(json.dumps({**state, "base_digest": checkpoint_digest(sharp)}))  # as the CLI records it
    other = tmp_path / "other"
    mtc.write_hf(other, mtc.TINY, seed=5)
    mtc.copy_tokenizer(other, tokenizer_json)
    ask = ["--temperature", "0", "--max-tokens", "2", "-p", "France"]
    assert main(["generate", "--model", str(sharp), "--adapter", str(adapter), *ask]) == 0
    assert "note:" not in capsys.readouterr().err  # its own base: nothing to say
    assert main(["generate", "--model", str(other), "--adapter", str(adapter), *ask]) == 0
    said = f"gptoss-mlx: note: the adapter {adapter} was trained on other weights ({sharp}) than those in {other}"
    assert said in capsys.readouterr().err
    assert main(["fuse", "--model", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "fused")]) == 0
    assert said in capsys.readouterr().err
    with pytest.warns(UserWarning, match="was trained on other weights"):
        load(other, adapter=adapter)


def test_serve_with_an_adapter_names_it(trained, sharp, monkeypatch, capsys):
    """serve --adapter listed the base model's id (in /v1/models, /health and every response),
    as if the adapter were not there. The id is now BASE+ADAPTER; requests naming the base
    still go through."""
    import gptoss_mlx.server as server
    from gptoss_mlx.server.errors import APIError

    _, out, _ = trained
    served = []
    monkeypatch.setattr(server, "serve", lambda service, *a, **k: served.append(service))
    assert main(["serve", "--model", str(sharp), "--adapter", str(out), "--port", "0"]) == 0
    (service,) = served
    assert service.model_name == f"{sharp}+{out.name}", service.model_name
    assert f"Serving {sharp}+{out.name} on" in capsys.readouterr().err
    for name in (service.model_name, str(sharp), f"{sharp.name}+{out.name}", sharp.name, None):
        service.check_model({"model": name})
    with pytest.raises(APIError, match="does not exist"):
        service.check_model({"model": "gpt-oss-120b"})


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.at[0].add(float("nan")), "holds NaN or infinite values"),
    (lambda a: a.at[0].add(float("inf")), "holds NaN or infinite values"),
    (lambda a: a.astype(mx.int32), "holds int32 values; an adapter's are floating point"),
])
def test_an_adapter_with_bad_values_is_refused_by_its_tensor(trained, sharp, tmp_path, damage, message):
    _, out, _ = trained
    weights = mx.load(str(out / ADAPTER_WEIGHTS))
    name = sorted(weights)[3]
    weights[name] = damage(weights[name])
    copy = tmp_path / "adapter"
    copy.mkdir()
    (copy / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    mx.save_safetensors(str(copy / ADAPTER_WEIGHTS), weights)
    with pytest.raises(AdapterError, match=f"{name} {message}"):
        load(sharp, adapter=copy)


def test_a_rank_above_the_layers_sizes_is_refused(sharp):
    model, _ = load(sharp)
    smallest = mtc.TINY.hidden_size  # every adapted layer reads or writes the residual stream
    with pytest.raises(AdapterError, match=f"rank {smallest + 1} is above .* use at most {smallest}"):
        apply_lora(model, LoRAConfig(rank=smallest + 1, targets=("attention", "experts")))
    apply_lora(model, LoRAConfig(rank=smallest, targets=("attention", "experts")))  # the largest that helps


def test_resuming_equals_an_uninterrupted_run(sharp, tok, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:4]])
    examples, _ = ft.load_data(data, tok, 512)
    settings = ft.Settings(rank=4, alpha=8, targets=("attention", "experts", "router"), iters=4,
                           batch_size=2, learning_rate=1e-3, steps_per_report=1, save_every=100)

    def run(out, stop_at=None, resume=None):
        stop = threading.Event()  # what Ctrl-C sets
        s = ft.resumed_settings(resume, {}) if resume else settings
        for event in ft.train(load(sharp)[0], str(sharp), examples, s, out, resume=resume, stop=stop):
            if isinstance(event, ft.Progress) and event.step == stop_at:
                stop.set()
        return mx.load(str(out / ADAPTER_WEIGHTS)), mx.load(str(out / ft.OPTIMIZER_FILE))

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_at=2)
    state = ft.read_state(tmp_path / "resumed")
    assert state["step"] == 2
    resumed = run(tmp_path / "resumed", resume=state)
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert mx.array_equal(a[k], b[k]).item(), k
    with pytest.raises(ft.DataError, match="--rank 4"):
        ft.resumed_settings(state, {"rank": 8})


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "nan"], "argument --alpha: must be a finite number above 0"),
    (["--learning-rate", "inf"], "argument --learning-rate: must be a finite number above 0"),
    (["--seed", "-1"], "argument --seed: must be at least 0"),
    (["--seed", str(2**64)], "argument --seed: must be below 2**64"),
    (["--adapter-path", ""], "argument --adapter-path: expected a directory"),
    (["--iters", str(2**63)], "argument --iters: must be below 2**53"),  # was MLX's std::bad_cast
    (["--alpha", "1e38"], "argument --alpha: must be at most 65536"),  # trained an adapter of zeros
    (["--learning-rate", "1e300"], "argument --learning-rate: must be at most 1"),  # inf in float32
    # 0 in float32: an adapter that learned (applied) nothing, silently (a tester's, helper-150)
    (["--learning-rate", "1e-320"], "argument --learning-rate: must be at least 1e-30 (less is 0 in float32)"),
    (["--alpha", "1e-300"], "argument --alpha: must be at least 1e-30"),
])
def test_bad_numbers_and_paths_are_refused_before_anything_loads(tmp_path, capsys, flags, message):
    args = ["finetune", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "d.jsonl"),
            "--adapter-path", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("where, message", [
    ("file", "is a file, not a directory"),
    ("file/sub", "cannot be written"),
    ("model", "holds a model checkpoint"),
])
def test_an_adapter_path_that_cannot_take_the_adapter_is_refused_before_training(tmp_path, capsys, where, message):
    """It was found at the first save, after the whole run, as a traceback."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / where
    assert main(["finetune", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "d.jsonl"),
                 "--adapter-path", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--adapter-path {out} {message}" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "model" / ADAPTER_WEIGHTS).exists()


def test_a_save_cut_short_or_a_damaged_checkpoint_is_named_on_resume(sharp, tok, tmp_path):
    """A kill between the checkpoint's files left an adapter a step ahead of its state, which
    --resume continued from (not exactly); a cut optimizer file gave a traceback."""
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    examples, _ = ft.load_data(data, tok, 512)
    settings = ft.Settings(rank=4, iters=3, learning_rate=1e-3, save_every=1)
    out = tmp_path / "out"
    list(ft.train(load(sharp)[0], str(sharp), examples, settings, out))
    assert ft.read_state(out)["step"] == 3
    state = json.loads((out / ft.TRAINING_STATE).read_text())
    (out / ft.TRAINING_STATE).write_text(json.dumps({**state, "step": 2}))  # the kill came before it
    with pytest.raises(ft.DataError, match=r"the save at step 3 was cut short \(adapters.safetensors is "
                                           r"from step 3, training_state.json from step 2\)"):
        ft.read_state(out)
    (out / ft.TRAINING_STATE).write_text(json.dumps(state))
    optimizer = (out / ft.OPTIMIZER_FILE).read_bytes()
    (out / ft.OPTIMIZER_FILE).write_bytes(optimizer[: len(optimizer) // 2])
    with pytest.raises(ft.DataError, match="optimizer.safetensors: damaged or missing"):
        ft.read_state(out)
    (out / ft.OPTIMIZER_FILE).write_bytes(optimizer)
    # A rank edited in the state was believed: the run went on at rank 4 saved as rank 8.
    edited = {**state, "settings": {**state["settings"], "rank": 8}}
    (out / ft.TRAINING_STATE).write_text(json.dumps(edited))
    with pytest.raises(ft.DataError, match="training_state.json and adapter_config.json disagree"):
        ft.read_state(out)
    # Edited in both: the tensors (rank 4) are refused by name.
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "rank": 8}))
    resumed = ft.resumed_settings(ft.read_state(out), {"iters": 4})
    with pytest.raises(AdapterError, match=r"lora_[ab] has shape .*, this model with this adapter_config.json needs"):
        list(ft.train(load(sharp)[0], str(sharp), examples, resumed, out, resume=ft.read_state(out)))


@pytest.mark.parametrize("field, value", [("steps_per_report", 0), ("batch_size", "two"),
                                          ("learning_rate", None), ("iters", "9"), ("schedule", "linear"),
                                          ("targets", ["attention", "mlp"]), ("step", True)])
def test_a_damaged_training_state_is_named_on_resume(sharp, tok, tmp_path, field, value):
    """A state file edited or damaged gave ZeroDivisionError, TypeErrors from deep inside MLX,
    "the save at step True was cut short", or (an unknown schedule) a constant rate."""
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    examples, _ = ft.load_data(data, tok, 512)
    out = tmp_path / "out"
    list(ft.train(load(sharp)[0], str(sharp), examples, ft.Settings(rank=4, iters=1), out))
    state = json.loads((out / ft.TRAINING_STATE).read_text())
    if field == "step":
        state["step"] = value
    else:
        state["settings"][field] = value
    (out / ft.TRAINING_STATE).write_text(json.dumps(state))
    with pytest.raises(ft.DataError, match="damaged") as e:
        ft.resumed_settings(ft.read_state(out), {})
    assert field in str(e.value)


def test_a_save_that_fails_keeps_the_one_before(sharp, tok, tmp_path, monkeypatch):
    """A full disk during a save replaced the adapter, then failed on the optimizer: --resume
    then refused the directory ("cut short"), and the good save before it was gone."""
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    examples, _ = ft.load_data(data, tok, 512)
    out = tmp_path / "out"
    real = mx.save_safetensors

    def full_disk_at_step_4(path, arrays, metadata=None):
        if "optimizer" in path and (metadata or {}).get(ft.STEP_KEY) == "4":
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a part of it, then no space
            raise RuntimeError("[save_safetensors] Failed to write: No space left on device")
        return real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", full_disk_at_step_4)
    settings = ft.Settings(rank=4, iters=6, learning_rate=1e-3, save_every=2)
    with pytest.raises(ft.DataError, match="saving step 4 .* failed .*the save before it is kept"):
        list(ft.train(load(sharp)[0], str(sharp), examples, settings, out))
    assert ft.read_state(out)["step"] == 2  # whole, and resumable
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ADAPTER_WEIGHTS, "adapter_config.json", ft.OPTIMIZER_FILE, ft.TRAINING_STATE])  # no temporary file left


def test_two_runs_on_one_adapter_directory_and_a_resume_on_another_base_are_refused(sharp, tmp_path, capsys):
    """Two runs on one --adapter-path both said "Saved" and one's work was overwritten (or one
    died on the other's temporary file); --resume with another --model or --dense-bits went on
    training the adapter on a second model."""
    from gptoss_mlx.cli.finetune import run_lock

    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    out = tmp_path / "out"
    run = ["finetune", "--model", str(sharp), "--data", str(data), "--adapter-path", str(out), "--rank", "2"]
    out.mkdir()
    with run_lock(out, made=False):  # another run holds it
        assert main([*run, "--iters", "1"]) == 2
    assert "is in use by another finetune run" in capsys.readouterr().err
    assert main([*run, "--iters", "1"]) == 0
    assert ft.read_state(out)["step"] == 1
    import shutil
    other = tmp_path / "other"  # other weights
    mtc.write_hf(other, mtc.TINY, seed=4)
    mtc.copy_tokenizer(other, sharp / "tokenizer.json")
    for flags, says in ((["--model", str(other)], f"this run started on other weights ({sharp.resolve()})"),
                        (["--dense-bits", "8"], "this run started with no --dense-bits")):
        assert main([*run, "--iters", "2", "--resume", *flags]) == 2
        assert says in capsys.readouterr().err
    moved = tmp_path / "moved"  # the same weights elsewhere (moved, or copied): it goes on
    shutil.copytree(sharp, moved)
    assert main([*run[:2], str(moved), *run[3:], "--iters", "2", "--resume"]) == 0
    assert ft.read_state(out)["step"] == 2
    empty = tmp_path / "never"  # a start that fails leaves no directory behind
    assert main([*run[:-4], "--adapter-path", str(empty), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert not empty.exists()


def test_a_diverging_run_stops_by_name_and_keeps_its_last_checkpoint(sharp, tok, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    examples, _ = ft.load_data(data, tok, 512)
    settings = ft.Settings(rank=4, iters=6, learning_rate=1e30, save_every=1)
    out = tmp_path / "out"
    with pytest.raises(ft.DataError, match="training diverged .*the last checkpoint in .* is kept"):
        list(ft.train(load(sharp)[0], str(sharp), examples, settings, out))
    step = ft.read_state(out)["step"]
    weights = mx.load(str(out / ADAPTER_WEIGHTS))
    assert step >= 1 and all(mx.isfinite(w).all().item() for w in weights.values())


# ------------------------------------------------------------------------------------ fusing
def random_adapter(sharp, out, targets, seed=1):
    """An adapter with nonzero B everywhere, saved in ``out``; returns the adapted model."""
    model, _ = load(sharp, dtype="float32")
    mx.random.seed(seed)
    config = LoRAConfig(4, 8, targets)
    apply_lora(model, config)
    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRASwitchLinear)):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    save_adapter(model, out, config)
    return model


@pytest.mark.parametrize("targets", [("attention",), ("attention", "experts")])
def test_a_fused_checkpoint_gives_the_logits_of_base_plus_adapter(sharp, tok, tmp_path, targets, capsys):
    adapted = random_adapter(sharp, tmp_path / "adapter", targets)
    fused_dir = tmp_path / "fused"
    assert main(["fuse", "--model", str(sharp), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(fused_dir)]) == 0
    assert (fused_dir / FUSED_EXPERT_ADAPTER).is_dir() == ("experts" in targets)
    prompt = mx.array([tok.encode("The fused model answers like the adapted one.")])
    base = load(sharp, dtype="float32")[0](prompt)
    want = adapted(prompt)
    got = load(fused_dir, dtype="float32")[0](prompt)
    # The merged weights are stored in bf16, as the base's are: that rounding, nothing more.
    assert mx.abs(got - want).max().item() < 0.05 * mx.abs(want - base).max().item()
    assert mx.array_equal(got.argmax(-1), want.argmax(-1)).item()
    if "experts" in targets:  # merged into MXFP4 on request, with the error reported
        assert main(["fuse", "--model", str(sharp), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "requantized"), "--requantize-experts"]) == 0
        assert "error RMS" in capsys.readouterr().out
        assert not (tmp_path / "requantized" / FUSED_EXPERT_ADAPTER).exists()
        load(tmp_path / "requantized")  # a plain checkpoint in the published layout
        # streamed, the experts would miss their adapter: planned resident, naming both ways out
        with pytest.raises(MemoryPlanError, match=r"fused checkpoint whose experts keep their adapter .*fuse "
                                                  r"again with --requantize-experts.* The smallest limit that "
                                                  r"works is 1\.\d\d GB: pass --memory-limit 1\.\d\dGB"):
            load(fused_dir, memory_limit="1.02307GB", dense_bits=4)
        assert load(tmp_path / "requantized", memory_limit="1.02307GB", dense_bits=4)[0].expert_pool
        # models convert kept the experts and dropped their adapter: part of the fine-tune, silently
        assert main(["models", "convert", str(fused_dir), str(tmp_path / "converted"), "--dense-bits", "8"]) == 0
        converted = load(tmp_path / "converted")[0](prompt)
        assert mx.array_equal(converted, load(fused_dir, dense_bits=8)[0](prompt)).item()


def test_fuse_runs_where_the_gpu_plan_would_quantize_and_a_fused_checkpoint_is_not_fine_tuned(
        sharp, tmp_path, monkeypatch, capsys):
    """On a small machine fuse loaded through the GPU's memory plan (8-bit dense layers) and
    failed, blaming --dense-bits, which it has not; finetune on a fused checkpoint that keeps
    its expert adapter said "the model already has an adapter" after loading it."""
    random_adapter(sharp, tmp_path / "adapter", ("attention", "experts"))
    fuse = ["fuse", "--model", str(sharp), "--adapter", str(tmp_path / "adapter")]
    assert main([*fuse, "--out", str(tmp_path / "roomy")]) == 0
    monkeypatch.setenv("GPTOSS_MLX_DEVICE_MEMORY", "1.05GB")  # the plan: dense layers 8-bit
    import mlx.nn as nn
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in load(sharp)[0].named_modules())
    assert main([*fuse, "--out", str(tmp_path / "small")]) == 0
    for name in ("model-00001-of-00001.safetensors", f"{FUSED_EXPERT_ADAPTER}/{ADAPTER_WEIGHTS}"):
        assert (tmp_path / "roomy" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()
    capsys.readouterr()
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    assert main(["finetune", "--model", str(tmp_path / "small"), "--data", str(data),
                 "--adapter-path", str(tmp_path / "again"), "--targets", "attention"]) == 2
    err = capsys.readouterr().err
    assert "is a fused checkpoint whose expert adapter stays beside its experts" in err
    assert "--requantize-experts" in err and "Loading" not in err


@pytest.mark.parametrize("targets", [("attention",), ("experts",)])
def test_fusing_an_adapter_that_overflows_writes_nothing(sharp, tmp_path, capsys, targets):
    """alpha 1e300: the merged weights are infinite. fuse said "Saved", and the checkpoint it
    wrote failed to load as corrupt; requantized into MXFP4 the experts became zeros, silently.
    Such an alpha is refused where the adapter is read (a tester's, helper-136: 1e38 loaded into
    chat and generate, whose every logit was then NaN, "its weights are corrupt")."""
    random_adapter(sharp, tmp_path / "adapter", targets)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "alpha": 1e300}))
    assert main(["fuse", "--model", str(sharp), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "fused"), *(["--requantize-experts"] if "experts" in targets else [])]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json: alpha must be a number from 1e-30 to 65536, got 1e+300" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(AdapterError, match="adapter_config.json: alpha must be a number from 1e-30 to 65536"):
        load(sharp, adapter=tmp_path / "adapter")
    # and one that is 0 in float32 applied nothing, silently (the re-attack, helper-153)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "alpha": 1e-300}))
    with pytest.raises(AdapterError, match="alpha must be a number from 1e-30 to 65536, got 1e-300"):
        load(sharp, adapter=tmp_path / "adapter")


def test_an_adapter_file_that_is_a_directory_is_said_so(sharp, tmp_path):
    """A tester's (helper-136): it read "cannot read the adapter ([read] Unable to read 8 bytes from file.)"."""
    random_adapter(sharp, tmp_path / "adapter", ("attention",))
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).unlink()
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).mkdir()
    with pytest.raises(AdapterError, match="adapters.safetensors: is a directory, not a regular file"):
        load(sharp, adapter=tmp_path / "adapter")


def test_data_from_a_pipe_is_refused_before_anything(sharp, tmp_path, capsys):
    """A tester's (helper-136): --data <(cat data.jsonl) trained, but the digest --resume checks
    read the pipe again, empty, so the run said "--resume continues the run" and never could."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    line = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    # (a writer, so that a finetune that reads the pipe goes on and fails the test, not hangs it)
    threading.Thread(target=lambda: (tmp_path / "pipe.jsonl").write_text(line), daemon=True).start()
    assert main(["finetune", "--model", str(sharp), "--data", str(tmp_path / "pipe.jsonl"),
                 "--adapter-path", str(tmp_path / "out"), "--iters", "1"]) == 2
    assert "--data " in (err := capsys.readouterr().err) and "is a FIFO" in err and "give a file" in err
    assert not (tmp_path / "out").exists()


def test_mlx_lm_loads_a_fused_checkpoint(sharp, tmp_path):
    random_adapter(sharp, tmp_path / "adapter", ("attention",))
    assert main(["fuse", "--model", str(sharp), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "fused")]) == 0
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(tmp_path / "fused"))
    ours, _ = load(tmp_path / "fused")
    prompt = mx.array([[200006, 1000, 2000, 3000]])
    theirs, mine = (np.array(m(prompt).astype(mx.float32)) for m in (model, ours))
    assert np.abs(theirs - mine).max() < 0.03 * np.abs(mine).max()  # bf16 arithmetic apart


def test_decoding_token_by_token_runs_the_adapted_router_and_experts(sharp, tok, tmp_path):
    """At decode-sized batches the fused MoE and router kernels would read the packed weights
    and skip the adapters: adapted layers take the ops path, so decoding equals the full pass."""
    adapted = random_adapter(sharp, tmp_path / "adapter", ("router", "experts"))
    model, _ = load(sharp, dtype="float32", adapter=tmp_path / "adapter")
    tokens = tok.encode("Decode one token at a time")
    cache = model.make_cache()
    steps = mx.concatenate([model(mx.array([[t]]), cache=cache) for t in tokens], axis=1)
    assert mx.allclose(steps, adapted(mx.array([tokens])), atol=1e-3).item()


def test_ctrl_c_saves_even_when_the_output_has_gone(sharp, tmp_path):
    """`finetune ... | tee log` and Ctrl-C: the same Ctrl-C ended tee, writing 'stopping...'
    failed, and the run ended without saving anything (so did a closed terminal). Output that
    cannot be written is dropped; the step finishes and the adapter is saved."""
    import signal
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS])
    out = tmp_path / "adapter"
    # (standard error stays readable, as on a terminal beside `| tee`)
    with (tmp_path / "stderr").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gptoss_mlx", "finetune", "--model", str(sharp),
                                 "--data", str(data), "--adapter-path", str(out), "--iters", "100000",
                                 "--steps-per-report", "1", "--save-every", "100000"],
                                stdout=subprocess.PIPE, stderr=stderr)
    try:
        while not proc.stdout.readline().startswith(b"step "):  # training is under way
            assert proc.poll() is None, "finetune ended before its first step"
        proc.stdout.close()  # the reader goes away (as tee does on the same Ctrl-C)
        proc.send_signal(signal.SIGINT)
        # the same stop again at once (`timeout` signals the process and its group; a closed
        # terminal sends SIGHUP twice): it ended the run without saving
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 130, (tmp_path / "stderr").read_text()[-2000:]
    assert ft.read_state(out)["step"] >= 1 and (out / ADAPTER_WEIGHTS).exists()


@pytest.mark.parametrize("sig, said", [
    ("SIGINT", "Ctrl-C: stopping after this step and saving (Ctrl-C again to quit without saving)"),
    ("SIGTERM", "SIGTERM: stopping after this step and saving"),
    ("SIGHUP", "the terminal closed: stopping after this step and saving")])
def test_the_stop_note_offers_a_second_ctrl_c_only_after_a_ctrl_c(sig, said):
    """SIGTERM's note offered "Ctrl-C again" (a kill, or a closed terminal, has no one to press it)."""
    import signal
    from gptoss_mlx.cli.finetune import StopRequest

    notes = []
    stop = threading.Event()
    StopRequest(stop, SimpleNamespace(note=notes.append))(getattr(signal, sig))
    assert stop.is_set() and notes == [said]


def test_a_stop_note_written_in_the_middle_of_a_progress_line_is_no_crash(monkeypatch):
    """The stop signal's note runs between any two lines of the main thread: written while a
    progress line was (its write done, its flush to come) to a pipe whose reader had gone, it
    dropped the output, and the progress line's flush of it was an AttributeError (CI)."""
    from gptoss_mlx.cli.finetune import ProgressLine

    monkeypatch.setattr(common, "drop_output", lambda: None)

    class GonePipe:
        def write(self, text):
            if text.startswith("step"):  # the signal arrives now
                show.note("Ctrl-C: stopping after this step and saving")
            else:
                raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self):
            return False

    show = ProgressLine(GonePipe())
    show.event(ft.Progress(1, 10, 1.0, 100.0, 1.0, 1.0, 9.0))
    assert show.out is None


def test_a_batch_larger_than_the_data_is_said(sharp, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    assert main(["finetune", "--model", str(sharp), "--data", str(data), "--adapter-path",
                 str(tmp_path / "out"), "--iters", "1", "--batch-size", "100"]) == 0
    err = capsys.readouterr().err  # the README's notes: on standard error, each line "gptoss-mlx: note:"
    assert "gptoss-mlx: note: --batch-size 100 is more than the 2 conversations: each step trains on all 2" in err


def test_fuse_and_convert_onto_a_full_disk_say_so_and_keep_nothing(sharp, tmp_path, capsys, monkeypatch):
    """MLX's writer raising "[write] Unable to write ..." (a full disk) was a traceback from fuse and
    `models convert` (a tester's, helper-150); a path through a file read "File exists"."""
    random_adapter(sharp, tmp_path / "adapter", ("attention",))

    def full(path, *args, **kwargs):
        raise RuntimeError("[write] Unable to write 25448812 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    for argv, out in ((["fuse", "--model", str(sharp), "--adapter", str(tmp_path / "adapter"), "--out"], "fused"),
                      (["models", "convert", str(sharp), "--dense-bits", "8"], "converted")):
        assert main([*argv, str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert f"error: {tmp_path / out}: writing it failed (" in err and "(is the disk full?)); nothing was kept" in err
        assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    (tmp_path / "file").write_text("")
    assert main(["models", "convert", str(sharp), "--dense-bits", "8", str(tmp_path / "file" / "x")]) == 2
    assert f"{tmp_path / 'file' / 'x'}: cannot create it ({tmp_path / 'file'} is not a directory)" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # (it named the folder above: the re-attack)
    assert main(["models", "convert", str(sharp), "--dense-bits", "8", str(tmp_path / "dangling" / "x")]) == 2
    assert f"({tmp_path / 'dangling'} is a link to {tmp_path / 'nowhere'}, which is not there)" in capsys.readouterr().err


def test_a_max_seq_len_past_the_models_context_is_refused(sharp, tmp_path, capsys):
    """It trained on sequences the model then refused to read (a tester's, helper-150)."""
    data = write_jsonl(tmp_path / "capitals.jsonl", [capitals_line(*c) for c in CAPITALS[:2]])
    positions = json.loads((sharp / "config.json").read_text())["max_position_embeddings"]
    assert main(["finetune", "--model", str(sharp), "--data", str(data), "--adapter-path", str(tmp_path / "out"),
                 "--max-seq-len", str(positions + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--max-seq-len {positions + 1} is longer than {sharp}'s context of {positions} tokens" in err
    assert not (tmp_path / "out").exists()

"""`gptoss-mlx generate` for scripts: -p -, --max-tokens cut-offs and --strict, statistics as
mlx_lm.generate prints them, --json; and help texts for every subcommand and flag."""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from gptoss_mlx.chat import Chat
from gptoss_mlx.cli import build_parser, common, main
from gptoss_mlx.generate import SamplingParams
from gptoss_mlx.tokenizer import load_tokenizer
from scripted import ScriptedModel

STATS = re.compile(r"==========\nPrompt: \d+ tokens, [\d.]+ tokens-per-sec\n"
                   r"Generation: \d+ tokens, [\d.]+ tokens-per-sec\nPeak memory: [\d.]+ GB\n")


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def script(tok, text):
    return tok.encode(text, allowed_special="all")


REPLY = ("<|channel|>analysis<|message|>Add them.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>It is 4.<|return|>")


def use_chat(monkeypatch, tok, replies, max_tokens=None):
    chat = Chat(ScriptedModel([script(tok, r) for r in replies]), tok, date="2025-08-05",
                sampling=SamplingParams(max_tokens=max_tokens))
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None: (
        chat if not toolbox else Chat(chat.engine.model, tok, engine=chat.engine,
                                      sampling=chat.sampling, **toolbox.chat_options())))
    return chat


def test_prompt_from_stdin_and_stats_on_stderr(tok, monkeypatch, capsys):
    chat = use_chat(monkeypatch, tok, [REPLY])
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\nAnswer briefly.\n"))
    assert main(["generate", "-p", "-"]) == 0
    out, err = capsys.readouterr()
    assert chat.messages[0].text == "What is 2+2?\nAnswer briefly."
    assert out == "It is 4.\n"
    assert "Add them." in err and STATS.search(err), err


def test_piped_code_keeps_its_first_lines_indent(tok, monkeypatch, capsys):
    """The re-attack's (helper-141, after the TUI's fix): standard input was strip()ped, so code
    piped in reached the model with its first line at column 0 and the others indented."""
    chat = use_chat(monkeypatch, tok, [REPLY])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n        return self._cache[key]\n    except KeyError:\n\n"))
    assert main(["generate", "-p", "-"]) == 0
    assert chat.messages[0].text == "        return self._cache[key]\n    except KeyError:"


def test_empty_stdin_prompt_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert main(["generate", "-p", "-"]) == 2
    assert "no prompt on standard input" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", None)  # started with standard input closed (<&-)
    assert main(["generate", "-p", "-"]) == 2
    assert "standard input is closed" in capsys.readouterr().err
    for empty in ("", " \n"):  # the same as an empty standard input (an empty -p was answered)
        assert main(["generate", "-p", empty]) == 2
        assert "the prompt is empty" in capsys.readouterr().err


def test_render_refuses_unknown_tools(tmp_path, capsys):
    chat = tmp_path / "c.json"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}')
    assert main(["render", str(chat), "--tools", "python,bogus"]) == 2
    assert "unknown tool(s) bogus" in capsys.readouterr().err


def test_cut_by_max_tokens_says_so_and_fails_only_when_strict(tok, monkeypatch, capsys):
    use_chat(monkeypatch, tok, [REPLY], max_tokens=3)
    assert main(["generate", "-p", "2+2?"]) == 0
    assert "cut off by --max-tokens (finish reason: length)" in capsys.readouterr().err
    use_chat(monkeypatch, tok, [REPLY], max_tokens=3)
    assert main(["generate", "-p", "2+2?", "--strict"]) == 1
    assert "cut off by --max-tokens" in capsys.readouterr().err
    use_chat(monkeypatch, tok, [REPLY])
    assert main(["generate", "-p", "2+2?", "--strict"]) == 0
    assert "cut off" not in capsys.readouterr().err


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_during_the_reply_keeps_what_was_made_and_says_so(tok, monkeypatch, capsys, as_json, stop):
    """A tester's (helper-120): Ctrl-C in generate exited 130 with nothing on stdout under
    --json, and without it left the answer's line open and said nothing. SIGTERM (`timeout 60
    gptoss-mlx generate --json`) ended it with 143 and nothing at all (helper-132): as Ctrl-C."""
    import os
    import signal
    import time

    from gptoss_mlx.cli import stream
    from gptoss_mlx.chat import AnswerDelta

    use_chat(monkeypatch, tok, ["<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant"
                                "<|channel|>final<|message|>It is 4, and more words to come.<|return|>"])
    real = stream.replies

    def interrupted(*args):
        for event in real(*args):
            yield event
            if isinstance(event, AnswerDelta):
                if stop.startswith("sigterm"):
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # (the handler's exception lands here)
                raise KeyboardInterrupt  # as a Ctrl-C lands while the reply streams

    monkeypatch.setattr(stream, "replies", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["generate", "-p", "2+2?"] + (["--json"] if as_json else [])) == (130 if stop == "ctrl-c" else 143)
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    out, err = capsys.readouterr()
    if as_json:
        data = json.loads(out)
        assert data["finish_reason"] == "interrupted" and data["answer"] and "It is 4".startswith(data["answer"][:7])
        # (usage was all zeros: the stopped reply has no Done to count from; helper-132)
        assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] > 0
    else:
        assert out.endswith("\n") and out.strip() and "It is 4, and more words".startswith(out.strip())
    assert err.rstrip().endswith("[stopped]")


def test_json_is_one_object_with_answer_reasoning_tool_calls_usage(tok, tmp_path, monkeypatch, capsys):
    functions = tmp_path / "weather.py"
    functions.write_text('def get_weather(city: str) -> dict:\n    """Current weather."""\n'
                         '    return {"city": city, "temp_c": -3}\n')
    use_chat(monkeypatch, tok, [
        "<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Oslo"}<|call|>', REPLY])
    assert main(["generate", "-p", "Weather in Oslo?", "--json", "--functions", str(functions)]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # the whole of standard output
    assert data["answer"] == "It is 4." and data["reasoning"] == "Add them."
    assert data["tool_calls"] == [{"name": "functions.get_weather", "arguments": '{"city": "Oslo"}',
                                   "result": '{"city": "Oslo", "temp_c": -3}'}]
    usage = data["usage"]
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert data["finish_reason"] == "stop"
    assert "Add them." not in err and STATS.search(err)


def test_a_preamble_and_the_answer_are_apart_in_plain_and_json_output(tok, tmp_path, monkeypatch, capsys):
    """A tester's: "I will check the weather for you." then the answer came out glued ("...for
    you.Answer"), in the plain output and in --json's answer (and its reasoning's two rounds)."""
    functions = tmp_path / "weather.py"
    functions.write_text('def get_weather(city: str) -> dict:\n    """Current weather."""\n'
                         '    return {"city": city, "temp_c": -3}\n')
    call = ("<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary<|message|>"
            "I will check.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
            '<|constrain|>json<|message|>{"city": "Oslo"}<|call|>')
    for flags, check in ((["--json"], lambda out: (json.loads(out)["answer"], json.loads(out)["reasoning"])),
                         ([], lambda out: (out.strip(), None))):
        use_chat(monkeypatch, tok, [call, REPLY])
        assert main(["generate", "-p", "Weather in Oslo?", "--functions", str(functions), *flags]) == 0
        answer, reasoning = check(capsys.readouterr().out)
        assert answer == "I will check.\n\nIt is 4.", answer
        assert reasoning in (None, "Need it.\n\nAdd them.")
    # preambles just before the answer, no call between them, came out glued as well
    direct = ("<|channel|>commentary<|message|>Let me see.<|end|><|start|>assistant<|channel|>commentary"
              "<|message|>And think.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>")
    for flags, check in ((["--json"], lambda out: json.loads(out)["answer"]), ([], str.strip)):
        use_chat(monkeypatch, tok, [direct])
        assert main(["generate", "-p", "Weather in Oslo?", *flags]) == 0
        assert check(capsys.readouterr().out) == "Let me see.\n\nAnd think.\n\nIt is 4."


def test_real_program_json_strict_from_stdin(tiny_checkpoint):
    ckpt = tiny_checkpoint
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_mlx", "generate", "--model", str(ckpt), "-p", "-", "--json",
         "--max-tokens", "4", "--seed", "0", "--strict", "--effort", "low"],
        input="Hello?", capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 4
    assert "cut off by --max-tokens" in proc.stderr and STATS.search(proc.stderr)


def test_a_full_or_closed_stderr_loses_the_notes_not_the_answer(tiny_checkpoint):
    """A tester's (helper-132): with standard error full (2>/dev/full) or closed (2>&-) the
    "Loading" note failed as if the output had, and generate exited 1 with nothing on stdout."""
    argv = [sys.executable, "-m", "gptoss_mlx", "generate", "--model", str(tiny_checkpoint), "-p", "hi",
            "--max-tokens", "4", "--seed", "0"]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert plain.returncode == 0 and plain.stdout.strip(), plain.stderr
    with open("/dev/full", "w") as full:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=full, text=True, timeout=180)
    assert (proc.returncode, proc.stdout) == (0, plain.stdout)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=180,
                          preexec_fn=lambda: os.close(2))
    assert (proc.returncode, proc.stdout) == (0, plain.stdout)


def subcommands(parser=None, prefix=""):
    """Every subcommand's parser by its full name ("models pull"), nested ones included."""
    parser = parser or build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found |= subcommands(sub, prefix + name + " ")
    return found


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_and_flag_has_help(name):
    p = subcommands()[name]
    assert p.description, f"{name} --help has no description"
    missing = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not missing, f"{name}: no help for {missing}"


@pytest.mark.parametrize("flag", ["--effort", "--reasoning-effort", "-e"])
def test_effort_spellings(flag):
    for name in ("chat", "generate", "tui", "render"):
        extra = ["-p", "x"] if name == "generate" else ["f.json"] if name == "render" else []
        assert build_parser().parse_args([name, flag, "high", *extra]).reasoning_effort == "high"


@pytest.mark.parametrize("flag, message", [
    ("--seed=-1", "seed must be a whole number from 0 to 2**64 - 1, got -1"),
    ("--seed=99999999999999999999999", "seed must be a whole number from 0 to 2**64 - 1"),
    ("--temperature=nan", "temperature must be a finite number >= 0, got nan"),
    ("--temperature=inf", "temperature must be a finite number >= 0, got inf"),
    # (float32's range, where the logits are divided: 1e39 sampled reserved ids, helper-132)
    ("--temperature=1e39", "temperature must be at most 1e+38, got 1e+39"),
    ("--top-p=nan", "top_p must be in (0, 1], got nan"),
    ("--min-p=nan", "min_p must be in [0, 1), got nan"),
])
def test_bad_sampling_flags_are_one_error_before_loading(flag, message, capsys):
    assert main(["generate", "--model", "/nonexistent", "-p", "x", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptoss-mlx: error: {message}") and err.count("\n") == 1


@pytest.fixture()
def conversation(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}))
    return path


@pytest.mark.parametrize("redirect, status, error", [
    ("| head -c1 >/dev/null", 141, ""),  # the reader went away: quiet, as shell tools are
    (">/dev/full", 1, "gptoss-mlx: error: cannot write the output: No space left on device\n"),
    (">&-", 1, "gptoss-mlx: error: standard output is closed\n"),
])
def test_output_that_cannot_be_written_is_one_line_never_a_traceback(conversation, redirect,
                                                                      status, error):
    proc = subprocess.run(
        ["bash", "-c", f'"$0" -m gptoss_mlx render "$1" {redirect}; exit ${{PIPESTATUS[0]}}',
         sys.executable, str(conversation)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (status, error)


def test_help_and_version_into_a_full_disk_fail_saying_so(monkeypatch, capsys):
    """A tester's (helper-132): argparse swallowed the write error, so `--help > /dev/full` exited 0
    with nothing written (as `ls --help` does not). The real program once, the rest in-process."""
    full_disk = "gptoss-mlx: error: cannot write the output: No space left on device\n"
    proc = subprocess.run(["bash", "-c", '"$0" -m gptoss_mlx --help >/dev/full', sys.executable],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (1, full_disk)
    for args in (["--help"], ["--version"], [], ["chat", "--help"]):
        with open("/dev/full", "w") as full, monkeypatch.context() as m:
            m.setattr(sys, "stdout", full)
            assert main(args) == 1, args
        assert capsys.readouterr().err == full_disk, args
        with pytest.raises(SystemExit) if args else contextlib.nullcontext():  # (argparse's own exit, written)
            assert main(args) in (0, None)
        assert capsys.readouterr().out


def test_ctrl_c_while_the_command_loads_ends_it_without_a_traceback(monkeypatch, capsys):
    """Testers' (helper-132, helper-142): Ctrl-C in the first second (MLX, the model and Textual
    being imported) printed a traceback of the imports. The package loads none of them itself;
    the entry point imports the commands and ends on Ctrl-C with 130, as later."""
    import types

    from gptoss_mlx import launch

    proc = subprocess.run([sys.executable, "-c", "import sys, gptoss_mlx; assert 'mlx' not in sys.modules; "
                           "from gptoss_mlx import load; assert 'mlx' in sys.modules"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

    class Loading(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt  # as a Ctrl-C lands while the commands are imported
    monkeypatch.setitem(sys.modules, "gptoss_mlx.cli", Loading("gptoss_mlx.cli"))
    assert launch.main() == 130
    assert capsys.readouterr().err == "\n"


def test_a_second_sigterm_while_the_first_stops_the_reply_does_not_lose_it():
    """The re-attack's (helper-145): two SIGTERMs a millisecond apart: the second landed while the
    first's stop was handled, and what was made was never printed. The first stops the reply; the
    rest wait for it to end."""
    import os
    import signal
    import time

    from gptoss_mlx.cli import common

    with common.sigterm_as_ctrl_c():
        with pytest.raises(common.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # while the first is handled: no second exception
        time.sleep(0.05)
        # a later one stops it again (the third re-attack's: a first one caught by a function's own
        # `except:` left every later SIGTERM ignored, and `timeout` could no longer stop generate)
        time.sleep(common.SIGTERM_REPEAT_S)
        with pytest.raises(common.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

"""`gptoss-mlx chat` in a terminal: line editing and history (prompt_toolkit driven through a
pipe), autosave after every reply, --resume, /load and /save, --max-context and
--context-overflow, with a scripted model behind the real command."""

import io
import json
import os
import shlex
import signal
import sys
import threading
import time
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from gptoss_mlx.chat import AnswerDelta, Chat, ContextTrimmed, Done, ReasoningDelta
from gptoss_mlx.cli import chat as cli_chat
from gptoss_mlx.cli import build_parser, common, main
from gptoss_mlx.cli.lineedit import line_reader
from gptoss_mlx.generate import Engine, SamplingParams, Stats
from gptoss_mlx.harmony import Message
from gptoss_mlx.store import ConversationStore
from gptoss_mlx.tokenizer import load_tokenizer
from gptoss_mlx.tools.sandbox import SandboxLimits
from scripted import ScriptedModel, SlowChunks

LEFT, UP, ALT_ENTER, CTRL_R = "\x1b[D", "\x1b[A", "\x1b\r", "\x12"


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def answers(tok, *texts):
    return [tok.encode(f"<|channel|>analysis<|message|>Think {i}.<|end|><|start|>assistant"
                       f"<|channel|>final<|message|>{t}<|return|>", allowed_special="all")
            for i, t in enumerate(texts)]


def scripted_chat(tok, *texts) -> Chat:
    return Chat(ScriptedModel(answers(tok, *texts)), tok, reasoning_effort="low", date="2025-08-05")


def reading(lines):
    """A ``read(prompt)`` that types ``lines`` and then Ctrl-D."""
    lines = iter(lines)

    def read(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    return read


# ---- line editing ------------------------------------------------------------------------------

def test_arrow_keys_multiline_history_across_sessions_and_ctrl_r(tmp_path):
    history = tmp_path / "data" / "input-history"
    with create_pipe_input() as keys:
        read = line_reader(history, keys, DummyOutput())
        keys.send_text(f"helo{LEFT}l\r")  # the cursor moves back; the l goes before the o
        assert read(">>> ") == "hello"
        keys.send_text("first line\\\rsecond line\r")  # a trailing backslash continues
        assert read(">>> ") == "first line\nsecond line"
        keys.send_text(f"a{ALT_ENTER}b\r")
        assert read(">>> ") == "a\nb"
        keys.send_text('"""x\ry"""\r')  # an open triple quote continues
        assert read(">>> ") == '"""x\ny"""'
    assert history.stat().st_mode & 0o777 == 0o600  # what was typed is private, as the chats are
    history.chmod(0o644)  # as an older version left it
    with create_pipe_input() as keys:  # a new session reads the same history file
        read = line_reader(history, keys, DummyOutput())
        assert history.stat().st_mode & 0o777 == 0o600
        keys.send_text(f"{UP}{UP}{UP}{UP}{UP}\r")  # two lines of two multi-line messages
        assert read(">>> ") == "first line\nsecond line"
        keys.send_text(f"{CTRL_R}hel\r world\r")
        assert read(">>> ") == " worldhello"  # found, cursor at the match, then edited
        keys.send_text("\x04")
        with pytest.raises(EOFError):
            read(">>> ")


def test_a_questions_answer_is_no_message_for_the_history(tmp_path):
    """A tester's (helper-142): the y of /save's "Overwrite it? [y/N]" went into the input history,
    so Up and Ctrl-R brought back "y" and "yes" beside real messages, in later sessions too."""
    history = tmp_path / "input-history"
    with create_pipe_input() as keys:
        read = line_reader(history, keys, DummyOutput())
        keys.send_text("a message\r")
        assert read(">>> ") == "a message"
        keys.send_text("yes\r")
        assert read("Overwrite it? [y/N] ", remember=False) == "yes"
    assert "+a message" in history.read_text() and "yes" not in history.read_text()


def test_a_quoted_message_is_never_a_command_and_exit_takes_nothing_after_it(tok, store, monkeypatch):
    """Testers' (helper-142): a triple-quoted '/etc/hosts: what is it?' was run as the command
    /etc/hosts:, and a quoted /exit quit; '/exit now' quit where '/help me' refuses its words."""
    chat = scripted_chat(tok, "A hosts file.", "Bye.")
    status, out = run_chat(monkeypatch, chat, ['"""/etc/hosts: what is it?"""', "/exit now", '"""/exit"""'])
    assert status == 0 and "/exit takes nothing after it" in out and "unknown command" not in out
    assert [m.text for m in chat.messages if m.role == "user"] == ["/etc/hosts: what is it?", "/exit"]


def test_the_resume_hint_carries_the_options_the_chat_ran_with(tok, store, monkeypatch, tmp_path):
    """A tester's (helper-142): 'Continue with:' named only --model, so the chat reopened without
    its tools, and on a machine that needed --no-memory-check it could not load."""
    chat = scripted_chat(tok, "Four.")
    status, out = run_chat(monkeypatch, chat, ["2+2?"], ["--model", "my model", "--no-memory-check", "--tools",
                                                         "python", "--max-context", "4096", "--dense-bits", "8"])
    hint = next(line for line in out.splitlines() if line.startswith("Continue with:"))
    # (and the chats folder this run used: without it the hint found no such chat, helper-159)
    folder = f"GPTOSS_MLX_DATA_DIR={shlex.quote(os.environ['GPTOSS_MLX_DATA_DIR'])} "
    assert hint.startswith(f"Continue with: {folder}gptoss-mlx chat --model 'my model' --dense-bits 8 --max-context 4096 "
                           "--tools python --no-memory-check --resume "), hint
    # (helper-142's: a relative --functions path, pasted in another folder, was not found)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fns.py").write_text('def hello() -> str:\n    \"\"\"Say hello.\"\"\"\n    return "hi"\n')
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Four."), ["2+2?"], ["--functions", "fns.py"])
    assert status == 0 and f"--functions {tmp_path}/fns.py --resume " in out, out
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Four."), ["2+2?"], [
        "--auto-approve", "--python-timeout", "5", "--python-network", "--browser-allow-private"])
    assert "--python-timeout 5 --auto-approve --python-network --browser-allow-private --resume " in out, out
    # (the re-attack's: --memory-limit, kept as typed, was divided as a number: a TypeError at start)
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Four."), ["2+2?"], ["--memory-limit", "10.5GB"])
    assert status == 0 and "gptoss-mlx chat --memory-limit 10.5GB --resume " in out, out


def too_long_for_its_context(tok, monkeypatch, terminal, typed):
    """A chat of 300 tokens' context on a terminal of ``terminal`` (columns, rows), and a reader
    that types ``typed`` (a string, or what to make of the message offered) then Ctrl-D: (chat,
    read, the messages offered at each prompt)."""
    monkeypatch.setenv("COLUMNS", str(terminal[0]))
    monkeypatch.setenv("LINES", str(terminal[1]))
    chat = Chat(ScriptedModel(answers(tok, "Hm.")), tok, date="2025-08-05", max_context=300, context_overflow="error")
    offered = []

    def read(prompt, default=""):
        offered.append(default)
        if len(offered) > len(typed):
            raise EOFError
        line = typed[len(offered) - 1]
        return line(default) if callable(line) else line
    return chat, read, offered


def test_a_quoted_message_taken_back_is_still_no_command_when_sent_again(tok, store, monkeypatch):
    """The re-attack's (helper-145): a quoted '/exit' the chat took back (too long for the context)
    came back at the prompt unquoted, and Enter on it quit the chat."""
    chat, read, offered = too_long_for_its_context(tok, monkeypatch, (200, 60), [
        '"""/exit ' + "word " * 300 + '"""', lambda offered: offered])  # Enter on the message offered again
    cli_chat.Repl(chat, store, read, out=Terminal()).run()
    assert len(offered) == 3 and offered[1] == '"""/exit ' + "word " * 300 + '"""'


def test_unwritable_history_file_still_edits(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with create_pipe_input() as keys:
        read = line_reader(blocker / "input-history", keys, DummyOutput())
        keys.send_text(f"ok{LEFT}!\r")
        assert read(">>> ") == "o!k"


def test_a_history_file_that_cannot_be_written_any_more_still_edits(tmp_path, capsys, monkeypatch):
    """A disk that filled (or a data directory made read-only) after the chat started: each
    message raised in prompt_toolkit's event loop ("Unhandled exception ... Press ENTER")."""
    from prompt_toolkit.history import FileHistory

    def full(self, string):
        raise OSError(28, "No space left on device")
    history = tmp_path / "input-history"
    with create_pipe_input() as keys:
        read = line_reader(history, keys, DummyOutput())
        monkeypatch.setattr(FileHistory, "store_string", full)
        keys.send_text("first\r")
        assert read(">>> ") == "first"
        keys.send_text("second\r")
        assert read(">>> ") == "second"
        keys.send_text(f"{UP}{UP}\r")  # this session's history is kept in memory
        assert read(">>> ") == "first"
    assert "Unhandled exception" not in capsys.readouterr().err


def test_a_colour_code_typed_outside_a_paste_is_text_not_a_crash(tmp_path):
    """ESC[31m typed or pasted while a reply streamed (no bracketed paste then) reached the
    prompt as keys: prompt_toolkit read it as a mouse report and raised ValueError, which ended
    the chat and lost what was typed. It is text, as a bracketed paste keeps it."""
    with create_pipe_input() as keys:
        read = line_reader(tmp_path / "input-history", keys, DummyOutput())
        keys.send_text("see this log: \x1b[31mERROR\x1b[0m disk full\r")
        assert read(">>> ") == "see this log: \x1b[31mERROR\x1b[0m disk full"


def test_what_is_typed_during_a_reply_waits_at_the_next_prompt(monkeypatch):
    """Lines typed or pasted during a reply were each sent as a message of its own, unseen, and
    one could answer the reply's "Run it? [y/N]": the next prompt shows them, to edit or send,
    and the question before it gets none of them."""
    import pty

    from gptoss_mlx.cli import common, lineedit

    leader, follower = pty.openpty()
    with os.fdopen(follower, "r") as terminal:
        monkeypatch.setattr("sys.stdin", terminal)
        os.write(leader, b"question 8\ny\nand a line not ended")
        time.sleep(0.2)
        monkeypatch.setattr("builtins.input", lambda prompt="": "n")
        assert common.ask_on_terminal("print(1)") is False  # its own answer, not the typed "y"
        assert lineedit._held == ["question 8\ny\nand a line not ended"]
        assert lineedit.take_typeahead() == ""  # (taken once)
        lineedit._held.clear()
        os.write(leader, b"more\r\n")
        time.sleep(0.2)
        assert lineedit.take_typeahead() == "more"
        # (a re-attack) a paste still arriving when the prompt comes: taken whole, not half as a
        # draft and the rest as keys (its line breaks sending it, line by line)
        writer = threading.Thread(target=lambda: [(os.write(leader, b"line %d\r" % k), time.sleep(0.01))
                                                  for k in range(40)])
        os.write(leader, b"start\r")
        writer.start()
        taken = lineedit.take_typeahead()
        writer.join()
        assert taken == "start\n" + "\n".join(f"line {k}" for k in range(40))
    os.close(leader)


def test_keys_that_edit_typed_during_a_reply_do_not_become_text(monkeypatch):
    """A tester's (helper-129): arrow keys, Ctrl-A and Ctrl-D typed while a reply streamed (the
    terminal in line mode, nothing reading) reached the next prompt as text ("ax^[[DY^AS") and
    were sent to the model; Ctrl-D as a NUL. They are left out; a colour code pasted stays."""
    import pty

    from gptoss_mlx.cli import lineedit

    leader, follower = pty.openpty()
    with os.fdopen(follower, "r") as terminal:
        monkeypatch.setattr("sys.stdin", terminal)
        os.write(leader, b"ax\x1b[DY\x01S\x1b[A\x1bOP tab\tend\x04")  # \x04: Ctrl-D, in line mode
        time.sleep(0.2)
        assert lineedit.take_typeahead() == "axYS tab\tend"
        os.write(leader, b"log \x1b[31mERROR\x1b[0m\r\n")
        time.sleep(0.2)
        assert lineedit.take_typeahead() == "log \x1b[31mERROR\x1b[0m"
    os.close(leader)


def test_typing_during_a_reply_is_not_echoed_into_it(monkeypatch):
    """What is typed while a reply streams was echoed by the terminal into the reply's text: the
    terminal's echo is off for the reply (Ctrl-C still interrupts), on again for the code
    approval's question inside it and after it, and the typed text waits for the next prompt."""
    import pty
    import termios

    from gptoss_mlx.cli import common, lineedit

    leader, follower = pty.openpty()
    with os.fdopen(follower, "r") as terminal:
        monkeypatch.setattr("sys.stdin", terminal)

        def flags() -> int:
            return termios.tcgetattr(follower)[3]

        assert flags() & termios.ECHO
        asked = []
        monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(flags()) or "y")
        with lineedit.typing_hidden():
            assert not flags() & termios.ECHO and flags() & termios.ISIG
            os.write(leader, b"typed during the reply")
            time.sleep(0.1)
            assert common.ask_on_terminal("print(1)") is True
            assert asked[0] & termios.ECHO and not flags() & termios.ECHO
        assert flags() & termios.ECHO
        assert lineedit._held == ["typed during the reply"]
        lineedit._held.clear()
        import select

        echoed = os.read(leader, 65536) if select.select([leader], [], [], 0.2)[0] else b""
        assert b"typed during the reply" not in echoed  # (before: the terminal wrote it back)
        with lineedit.typing_hidden():
            assert flags() & termios.NOFLSH  # Ctrl-C keeps what was typed for the prompt
            resumed = termios.tcgetattr(follower)
            resumed[3] |= termios.ECHO  # as a shell resumes a job after Ctrl-Z and fg
            termios.tcsetattr(follower, termios.TCSANOW, resumed)
            os.kill(os.getpid(), signal.SIGCONT)
            time.sleep(0.05)
            assert not flags() & termios.ECHO
        assert flags() & termios.ECHO and not flags() & termios.NOFLSH
    os.close(leader)


def test_a_chat_terminated_during_a_reply_leaves_the_terminal_echoing():
    """SIGTERM during a reply (under a wrapper that does not reset the terminal, as an
    interactive shell does): the terminal's echo comes back before the process ends by it."""
    import pty
    import subprocess
    import termios

    leader, follower = pty.openpty()
    code = ("import sys, time\nfrom gptoss_mlx.cli import lineedit\nwith lineedit.typing_hidden():\n"
            "    print('hidden', flush=True)\n    time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"hidden\n"
        assert not termios.tcgetattr(follower)[3] & termios.ECHO
        child.terminate()
        assert child.wait(timeout=10) == -signal.SIGTERM
        assert termios.tcgetattr(follower)[3] & termios.ECHO
    finally:
        child.kill()
        os.close(leader), os.close(follower)


def test_read_message_line_by_line(tmp_path):
    repl = cli_chat.Repl(None, ConversationStore(tmp_path), reading(["one \\", "two", '"""three', 'four"""']))
    assert repl.read_message() == "one \ntwo"
    assert repl.read_message() == "three\nfour"


# ---- autosave, resume, load, save --------------------------------------------------------------

def run_chat(monkeypatch, chat, lines, argv=()):
    """``gptoss-mlx chat`` on a terminal, with ``chat`` as the loaded model and ``lines`` typed."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None: chat)
    monkeypatch.setattr(cli_chat, "line_reader", lambda history_file: reading(lines))
    monkeypatch.setattr("sys.stdout", out)
    status = main(["chat", *argv])
    return status, out.getvalue()


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(tmp_path / "data"))
    return ConversationStore()


def saved(store):
    return {p.stem: json.loads(p.read_text()) for p in store.root.glob("*.json")}


def saved_chats(store):
    return list(saved(store).values())


def test_saves_after_every_reply_says_where_and_resume_continues(tok, store, monkeypatch, capsys):
    chat = scripted_chat(tok, "Four.", "Eight.")
    counts = []
    save = ConversationStore.save

    def counting_save(self, chat, chat_id, title):  # on the chat's own store
        counts.append(sum(m.role == "user" for m in chat.messages))
        return save(self, chat, chat_id, title)

    monkeypatch.setattr(ConversationStore, "save", counting_save)
    status, out = run_chat(monkeypatch, chat, ["2+2?", "times 2?"])
    monkeypatch.undo()
    assert status == 0 and counts == [1, 2]  # after each reply (at the exit: saved already)
    ((chat_id, data),) = saved(store).items()
    assert data["title"] == "2+2?" and data["messages"][-1]["content"] == "Eight."
    assert f"Saved to {store.root / chat_id}.json" in out
    assert f"gptoss-mlx chat --resume {chat_id}" in out

    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(store.root.parent))
    again = scripted_chat(tok, "Sixteen.")
    status, out = run_chat(monkeypatch, again, ["and again?"], ["--resume"])
    assert status == 0 and 'Resumed "2+2?" (4 messages)' in out and "gpt-oss: Eight." in out
    # the hint names the model it ran with (without it, the default model: a 13 GB download)
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), [], ["--resume", "--model", "my models/tiny"])
    assert f"gptoss-mlx chat --model 'my models/tiny' --resume {chat_id}" in out
    ((same_id, data),) = saved(store).items()  # continued in the same file
    assert same_id == chat_id
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == [
        "2+2?", "times 2?", "and again?"]


def test_a_chat_resumed_and_left_as_it_was_is_not_written_again(tok, store, monkeypatch):
    """`chat --resume`, then Ctrl-D: the file was written again, so a window that had the chat
    open saved its next reply as "(copy)", a new chat. It is left as it was, and still said."""
    chat = scripted_chat(tok, "Four.")
    run_chat(monkeypatch, chat, ["2+2?"])
    ((chat_id, before),) = saved(store).items()
    stamp = (store.root / f"{chat_id}.json").stat().st_mtime_ns
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(store.root.parent))
    status, out = run_chat(monkeypatch, scripted_chat(tok, "unused"), [], ["--resume"])
    assert status == 0 and f"Saved to {store.root / chat_id}.json" in out
    assert (store.root / f"{chat_id}.json").stat().st_mtime_ns == stamp and saved(store) == {chat_id: before}
    status, out = run_chat(monkeypatch, scripted_chat(tok, "unused"), ["/effort high"], ["--resume"])
    assert (store.root / f"{chat_id}.json").stat().st_mtime_ns != stamp  # a change is saved
    chat = scripted_chat(tok, "unused")  # deleted meanwhile (another window): saved again, not "Saved"
    real_read = cli_chat.Repl.open

    def open_then_delete(self, chat_id):
        real_read(self, chat_id)
        (store.root / f"{chat_id}.json").unlink()
    monkeypatch.setattr(cli_chat.Repl, "open", open_then_delete)
    status, out = run_chat(monkeypatch, chat, [], ["--resume"])
    assert status == 0 and len(saved(store)) == 1 and "Saved to" in out
    ((again, data),) = saved(store).items()
    assert f"Saved to {store.root / again}.json" in out and data["messages"] == before["messages"]


def test_resume_of_a_model_says_how_to_resume_with_it(store, checkpoints, capsys):
    """`chat --resume DIR` reads DIR as the chat id (--resume takes one)."""
    model = str(checkpoints["hf"])
    assert main(["chat", "--resume", model]) == 2
    assert f"({model} is a model: `gptoss-mlx chat {model} --resume` resumes the latest chat with it)" \
        in capsys.readouterr().err


def test_resume_of_a_file_says_to_load_it(store, tmp_path, capsys):
    """A tester's (helper-129): `--resume PATH` said only "not a conversation id"."""
    path = tmp_path / "my chat.json"
    path.write_text('{"messages": []}')
    assert main(["chat", "--resume", str(path)]) == 2
    assert f"(a chat's file: start the chat, then `/load {path}`)" in capsys.readouterr().err


def test_resume_of_a_bad_file_fails_before_loading_the_model(store, monkeypatch, capsys):
    store.root.mkdir(parents=True)
    (store.root / "bad.json").write_text('{"messages": [{"role": "assistant", "tool_calls": 5}]}')
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr(common, "load_chat", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["chat", "--resume", "bad"]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "messages[0].tool_calls" in err and "Traceback" not in err
    assert main(["chat", "--resume", "nope"]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_a_loaded_chat_is_saved_on_exit_where_it_says(tok, store, monkeypatch):
    first = scripted_chat(tok, "Four.")
    list(first.send("2+2?"))
    path = store.save_as(first, store.root.parent / "elsewhere.json", "Elsewhere")
    status, out = run_chat(monkeypatch, scripted_chat(tok, "unused"), [f"/load {path}"])
    (saved_path,) = store.root.glob("*.json")
    assert f"Saved to {saved_path}" in out


def test_load_of_a_bad_file_keeps_the_conversation(tok, store, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"messages": [], "updated": "soon"}')
    chat = scripted_chat(tok, "Four.")
    status, out = run_chat(monkeypatch, chat, ["2+2?", f"/load {bad}", "/chats"])
    assert f"error: {bad}: updated must be a time in seconds" in out
    assert "(the current conversation stays)" in out
    assert [m.text for m in chat.messages if m.channel == "final"] == ["Four."]
    assert "2+2?  (2 messages)" in out  # /chats


def test_a_load_error_ending_in_a_carriage_return_shows_it(tok, store, tmp_path, monkeypatch):
    """The error line was made safe with its own line end after the message: a message ending
    in a lone carriage return (a file's name or content quoted) lost its marker."""
    from gptoss_mlx.chat_file import ChatFileError

    def refuse(chat, path):
        raise ChatFileError(f"{path.name}: says\r")
    monkeypatch.setattr(ConversationStore, "load_path", lambda self, chat, path: refuse(chat, path))
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), [f"/load {tmp_path / 'c.json'}"])
    assert "error: c.json: says<\\r>\n(the current conversation stays)" in out, out


def test_chats_lists_the_newest_says_how_many_more_and_finds_older_ones_by_title(tok, store, monkeypatch):
    """/chats showed the 20 newest and no more: an older chat could not be found (nor was it said
    that there were more). /chats all lists every one, /chats WORDS those with them in the title."""
    for k in range(25):
        chat = scripted_chat(tok, "ok")
        list(chat.send(f"q{k}"))
        store.save(chat, f"20261201-0000{k:02d}-aaaaaa", f"Trip {k}" if k != 3 else "Old TAX return")
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), ["/chats", "/chats tax", "/chats all", "/chats nothing-like-it"])
    lines = out.splitlines()
    assert sum("Trip" in line or "TAX" in line for line in lines) == 20 + 1 + 25
    assert "(20 newest of 25: /chats all lists every one, /chats WORDS those with the words in their title)" in out
    assert "20261201-000003-aaaaaa  Old TAX return  (2 messages)" in out
    assert "no saved conversation has 'nothing-like-it' in its title" in out


def test_load_of_a_saved_chat_that_is_not_a_file_names_it(tok, store, tmp_path, monkeypatch):
    """/chats named a FIFO among the saved chats, but /load ID said "does not exist" (the id was
    read as a path in the current folder, whose file of that name would have been loaded)."""
    store.root.mkdir(parents=True, exist_ok=True)
    os.mkfifo(store.root / "20261201-000000-fifo00.json")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "20261201-000000-fifo00").write_text("{}")
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), ["/load 20261201-000000-fifo00"])
    assert "is a FIFO (named pipe), not a regular file" in out and "(the current conversation stays)" in out, out


def test_save_over_a_saved_chat_names_the_conversation_it_replaces(tok, store, tmp_path):
    """/save onto another saved chat asked only "PATH exists. Overwrite it?": which conversation
    the answer loses is now said."""
    other = scripted_chat(tok, "Old.")
    list(other.send("old question"))
    store.save(other, "other", "Holiday plans")
    asked, lines = [], iter([f"/save {store.path('other')}", "n"])

    def read(prompt=""):
        asked.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    cli_chat.Repl(scripted_chat(tok, "x"), store, read, out=out).run()
    assert any('exists, the saved chat "Holiday plans" (2 messages). Overwrite it?' in p for p in asked), asked


def test_save_asks_before_overwriting(tok, store, tmp_path, monkeypatch):
    target = tmp_path / "mine.json"
    target.write_text("keep me")
    chat = scripted_chat(tok, "Four.")
    status, out = run_chat(monkeypatch, chat, ["2+2?", f"/save {target}", "n"])
    assert "Overwrite" not in out  # asked through read(), answered n
    assert "not saved" in out and target.read_text() == "keep me"
    status, out = run_chat(monkeypatch, chat, [f"/save {target}", "y"])
    assert f"saved to {target}" in out and json.loads(target.read_text())["messages"]
    status, out = run_chat(monkeypatch, chat, [f"/save {tmp_path}"])
    assert f"not saved: {tmp_path} is a directory" in out
    status, out = run_chat(monkeypatch, chat, ["/save /proc/no-such-dir/c.json"])
    assert "not saved: /proc/no-such-dir/c.json cannot be written (No such file or directory)" in out
    assert "Errno" not in out
    status, out = run_chat(monkeypatch, chat, [f"/save {tmp_path}/new/deeper/c.json"])  # (helper-155)
    assert f"saved to {tmp_path}/new/deeper/c.json (made the folder {tmp_path}/new)" in out
    status, out = run_chat(monkeypatch, chat, [f"/save {tmp_path}/new/deeper/d.json"])
    assert f"saved to {tmp_path}/new/deeper/d.json\n" in out + "\n" and "made the folder" not in out


def test_save_and_load_of_paths_that_cannot_be_say_why_and_the_chat_goes_on(tok, store, tmp_path, monkeypatch):
    """A tester's (helper-155): /save ~nosuchuser/x.json (pathlib's RuntimeError) and a name of
    300 letters (an OSError from the link test) ended the chat with a traceback; a path through
    a file said "File exists"; /save "" wrote a file named "" (the quotes a shell takes away)."""
    (tmp_path / "big.txt").write_text("a file")
    long = tmp_path / ("a" * 300 + ".json")
    chat = scripted_chat(tok, "Four.")
    monkeypatch.chdir(tmp_path)
    status, out = run_chat(monkeypatch, chat, [
        "2+2?", "/save ~nosuchuser-36/x.json", f"/save {long}", f"/save {tmp_path}/big.txt/x.json",
        "/load ~nosuchuser-36/x.json", '/save ""', f'/save "{tmp_path}/my chat.json"', "/reasoning",
        '/save "unclosed.json', "/load 'unclosed", "/save ./~x36/here.json"])
    assert status == 0 and "Traceback" not in out
    assert "not saved: ~nosuchuser-36/x.json: there is no user 'nosuchuser-36' on this machine" in out
    assert "cannot be written (File name too long)" in out
    assert f"not saved: {tmp_path}/big.txt/x.json cannot be written ({tmp_path}/big.txt is a file, not a folder)" in out
    assert "error: ~nosuchuser-36/x.json: there is no user 'nosuchuser-36' on this machine" in out
    assert "usage: /save PATH" in out and not (tmp_path / '""').exists()
    assert json.loads((tmp_path / "my chat.json").read_text())["messages"]
    assert "reasoning: show (/reasoning show|hide changes it)" in out
    assert 'not saved: the quote that opens "unclosed.json is not closed' in out
    assert json.loads((tmp_path / "~x36" / "here.json").read_text())["messages"]  # ./~x36 is a folder here
    assert "error: the quote that opens 'unclosed is not closed" in out and not (tmp_path / '"unclosed.json').exists()


def test_resume_of_a_file_named_like_a_repo_says_to_load_it(store, tmp_path, monkeypatch, capsys):
    """`--resume bad/array.json` (a relative path, named like a Hugging Face repo id) was called
    a model, with a command that would load the chat file as one (helper-155)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "array.json").write_text("[]")
    assert main(["chat", "--resume", "bad/array.json"]) == 2
    err = capsys.readouterr().err
    assert "(a chat's file: start the chat, then `/load bad/array.json`)" in err and "is a model" not in err
    # a saved chat's file name, as the chats folder shows it, is its id (".json.json" was looked for)
    store.root.mkdir(parents=True)
    (store.root / "20261207-190213-7bacd3.json").write_text("[]")
    assert main(["chat", "--resume", "20261207-190213-7bacd3.json"]) == 2
    err = capsys.readouterr().err
    assert "20261207-190213-7bacd3.json:" in err and ".json.json" not in err


def test_save_never_replaces_a_fifo_or_link_and_keeps_a_files_mode(tok, store, tmp_path, monkeypatch):
    import os
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "real.json").write_text("keep me")
    os.symlink(tmp_path / "real.json", tmp_path / "link.json")
    chat = scripted_chat(tok, "Four.")
    status, out = run_chat(monkeypatch, chat, ["2+2?", f"/save {tmp_path / 'pipe.json'}", "y",
                                               f"/save {tmp_path / 'link.json'}", "y"])
    assert f"not saved: {tmp_path / 'pipe.json'} is a FIFO (named pipe), not a regular file" in out
    assert f"not saved: {tmp_path / 'link.json'} is a symbolic link" in out
    assert (tmp_path / "pipe.json").is_fifo() and (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "real.json").read_text() == "keep me"
    mine = tmp_path / "mine.json"
    mine.write_text("old")
    mine.chmod(0o644)
    status, out = run_chat(monkeypatch, chat, [f"/save {mine}", "y"])
    assert f"saved to {mine}" in out and json.loads(mine.read_text())["messages"]
    assert mine.stat().st_mode & 0o777 == 0o644


def test_a_chat_that_ends_at_a_call_never_run_says_so_and_tells_the_model(tok, store, tmp_path, monkeypatch):
    """A saved chat ending in a call with no result (saved before the call ran, then the process
    ended): /load showed only the question, and the model was never told the call did not run
    (a tester's, helper-157)."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    data = {"format": 1, "title": "weather", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning": "use the tool", "tool_calls": [call]}]}
    path = tmp_path / "ended.json"
    path.write_text(json.dumps(data))
    chat = scripted_chat(tok, "Sorry.")
    status, out = run_chat(monkeypatch, chat, [f"/load {path}", "and now?"])
    assert '[tool call → functions.get_weather] {"city": "Oslo"}' in out, out
    assert "[result ← functions.get_weather] Error: not run: the conversation ended before this call ran" in out
    roles = [(m.role, m.recipient) for m in chat.messages]
    call_at = roles.index(("assistant", "functions.get_weather"))
    assert roles[call_at + 1] == ("tool", "assistant") and roles[call_at + 2] == ("user", None), roles
    assert chat.messages[call_at + 1].text == "Error: not run: the conversation ended before this call ran"


def test_a_chat_with_tool_calls_has_one_length_in_every_list_and_load(tok, store, tmp_path, monkeypatch):
    """The chat list said 3 messages, /load ID 2 and /load PATH 5 for the same file."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    data = {"format": 1, "title": "weather", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning": "use the tool", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps(data))
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "20261201-000000-tool00.json").write_text(json.dumps(data))
    assert [e.messages for e in store.list()] == [3]
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), [f"/load {path}", "/load 20261201-000000-tool00", "/chats"])
    assert f"loaded 3 messages from {path}" in out and 'Resumed "weather" (3 messages)' in out
    assert "20261201-000000-tool00  weather  (3 messages)" in out  # /chats


def test_load_by_path_continues_in_the_store(tok, store, tmp_path, monkeypatch):
    first = scripted_chat(tok, "Four.")
    list(first.send("2+2?"))
    path = ConversationStore().save_as(first, tmp_path / "elsewhere.json", "Elsewhere")
    before = path.read_text()
    chat = scripted_chat(tok, "Eight.")
    status, out = run_chat(monkeypatch, chat, [f"/load {path}", "times 2?"])
    assert f"loaded 2 messages from {path}" in out
    assert path.read_text() == before  # replies go to the store, not over the loaded file
    (data,) = saved(store).values()
    assert data["title"] == "Elsewhere" and data["messages"][-1]["content"] == "Eight."


# ---- context ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("0", "must be at least 1"), ("-5", "must be at least 1"), ("lots", "expected a whole number"),
])
def test_max_context_must_be_positive(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "--max-context", value])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_max_context_beyond_the_models_positions_is_refused(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr(common, "load", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["generate", "--model", str(checkpoints["hf"]), "-p", "hi",
                 "--max-context", "999999999"]) == 2
    err = capsys.readouterr().err
    assert "999999999 is more than this model's 131072 positions" in err
    assert "max_position_embeddings" in err and str(checkpoints["hf"]) in err


def test_context_overflow_is_passed_to_chat(checkpoints, monkeypatch):
    made = []
    monkeypatch.setattr(common, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(common, "Chat", lambda *a, **kwargs: made.append(kwargs))
    parser = build_parser()
    for flags, expected in (([], "truncate"), (["--context-overflow", "error"], "error"),
                            (["--context-overflow", "truncate"], "truncate")):
        ns = parser.parse_args(["chat", "--model", str(checkpoints["hf"]), *flags])
        common.load_chat(ns, out=io.StringIO())
        assert made[-1].get("context_overflow") == expected


def test_an_empty_model_name_is_refused_not_taken_for_the_default(monkeypatch, capsys):
    """`-m ""` (an unset shell variable) quietly loaded the default model."""
    monkeypatch.setattr("gptoss_mlx.cli.chat.cmd_chat", lambda a: pytest.fail("ran"))
    for argv in (["chat", "-m", ""], ["chat", "--model", "  "], ["serve", ""], ["generate", "-m", "", "hi"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "empty: name a local checkpoint directory" in err, argv


def test_the_model_may_be_named_first(checkpoints, monkeypatch, capsys):
    """`chat DIR`, `tui DIR`, `serve DIR` as `vllm serve MODEL` takes it; `generate DIR` and a
    prompt without --prompt get a usage error that says what to write."""
    seen = []
    for command in ("chat", "tui", "serve"):
        monkeypatch.setattr(f"gptoss_mlx.cli.{command}.cmd_{command}", lambda a: seen.append(a.model) or 0)
    model = str(checkpoints["hf"])
    for command in ("chat", "tui", "serve"):
        assert main([command, model]) == 0
        assert main([command, "--model", model, model]) == 0
    assert seen == [model] * 6
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", "openai/gpt-oss-120b", model])
    assert e.value.code == 2 and "two models named" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", model, "--prompt", "hi"])
    assert f"unrecognized arguments: {model} (to run that model: --model {model})" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "why is the sky blue"])
    assert "(the prompt goes after --prompt, in quotes)" in capsys.readouterr().err


def test_a_call_to_a_tool_the_chat_lacks_gets_an_error_and_the_model_answers(tok, store, monkeypatch):
    """No tools given, and the model calls one anyway: it ended the reply with nothing said."""
    nope = tok.encode("<|channel|>analysis<|message|>Try it.<|end|><|start|>assistant<|channel|>commentary "
                      'to=functions.lookup <|constrain|>json<|message|>{"q": 1}<|call|>', allowed_special="all")
    chat = Chat(ScriptedModel([nope, *answers(tok, "Without it: 42.")]), tok, reasoning_effort="low")
    status, out = run_chat(monkeypatch, chat, ["what is it?"])
    assert status == 0 and "Without it: 42." in out
    result = [m for m in chat.messages if m.role == "tool"][0]
    assert result.text == ("Error: there is no tool 'functions.lookup': no tools are available here; "
                           "answer without them")


def test_a_message_too_long_for_the_screen_is_left_in_the_history_not_at_the_prompt(tok, store, monkeypatch):
    """A tester's (helper-142): a 277 KB paste too long for the context came back as the prompt's
    text, 2,000 rows that pushed the error out of sight; Enter sent it again, unseen, and it
    looked like a dead key. One that leaves too few of the terminal's rows stays in the history."""
    chat, read, offered = too_long_for_its_context(tok, monkeypatch, (80, 40), ["word " * 2000, "short " * 300])
    out = Terminal()
    cli_chat.Repl(chat, store, read, out=out).run()
    text = out.getvalue()
    assert "[the message is not in the chat: it is in the input history (Up brings it back" in text
    assert offered[1] == ""  # not at the prompt
    assert "[the message is not in the chat: it is back at the prompt" in text and offered[2] == "short " * 300


def test_a_round_after_a_tool_that_does_not_fit_keeps_the_message_and_says_so(tok, store, monkeypatch):
    """--context-overflow error: the tool ran, then the next round did not fit. The chat said
    "the message is not in the chat: it is back at the prompt" while it held the message, the
    call and its result (sending the draft again failed at once, and so did every message)."""
    nope = tok.encode("<|channel|>analysis<|message|>Try it.<|end|><|start|>assistant<|channel|>commentary "
                      'to=functions.lookup <|constrain|>json<|message|>{"q": 1}<|call|>', allowed_special="all")
    probe = Chat(ScriptedModel([nope]), tok, reasoning_effort="low", date="2025-08-05")
    first = len(probe.prompt_tokens([Message("user", "what is it?")]))
    chat = Chat(ScriptedModel([nope, *answers(tok, "Never.")]), tok, reasoning_effort="low", date="2025-08-05",
                context_overflow="error", max_context=first + 40 + 10, sampling=SamplingParams(max_tokens=40))
    status, out = run_chat(monkeypatch, chat, ["what is it?"])
    assert "error: the conversation is" in out and "the message is not in the chat" not in out
    assert "[the message and the tool calls answered so far stay in the chat; the reply could not go on]" in out
    assert [m.role for m in chat.messages][:1] == ["user"] and any(m.role == "tool" for m in chat.messages)


def test_trimmed_context_is_announced(tok, store, monkeypatch):
    chat = scripted_chat(tok, "unused")
    stats = Stats(finish_reason="stop")

    def send(text):
        yield ContextTrimmed(dropped_messages=4, dropped_tokens=1234)
        yield AnswerDelta("Still here.")
        yield Done(stats, "stop")

    monkeypatch.setattr(chat, "send", send)
    status, out = run_chat(monkeypatch, chat, ["one more?"])
    assert "[context full: dropped the 4 oldest messages (1234 tokens) to make room]" in out
    assert out.index("context full") < out.index("Still here.")


def test_a_full_context_is_said_once_until_more_is_left_out(tok, monkeypatch):
    """Once the conversation passed the context, every turn repeated "context full: dropped the N
    oldest messages", N the same until the cut moved (a quarter of the room at a time)."""
    chat = Chat(ScriptedModel(answers(tok, "Hm.")), tok, date="2025-08-05", max_context=1200,
                sampling=SamplingParams(temperature=0, max_tokens=16))
    status, out = run_chat(monkeypatch, chat, [f"question {k}: " + "tell me more " * 12 for k in range(30)])
    said = re.findall(r"\[context full: dropped the (\d+) oldest messages", out)
    assert status == 0 and 2 <= len(said) <= 10, said
    assert len(set(said)) == len(said) and [int(n) for n in said] == sorted(int(n) for n in said), said


# ---- tools wired into the terminal --------------------------------------------------------------

def test_approval_prompt_shows_hidden_characters(monkeypatch, capsys):
    """Issue 16: a carriage return must not hide the dangerous line from the person approving."""
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    code = "import shutil; shutil.rmtree('/Users/me')\r# tidy up the cache (harmless)\nprint('done')"
    assert common.ask_on_terminal(code) is False
    err = capsys.readouterr().err
    assert "\r" not in err and "hidden or control character" in err
    assert "shutil.rmtree('/Users/me')" in err and "<\\r>" in err


def test_no_answer_at_the_approval_prompt_stops_the_reply_rather_than_declining(monkeypatch):
    """A terminal closed at "Run it? [y/N]" (or Ctrl-D there) was saved as "the user declined to
    run this code", which a resumed model then read."""
    def closed(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", closed)
    with pytest.raises(KeyboardInterrupt):
        common.ask_on_terminal("print(1)")


def test_python_tool_without_an_os_sandbox_is_refused_in_one_line(monkeypatch, capsys):
    import gptoss_mlx.tools.sandbox as sandbox

    monkeypatch.setattr(sandbox, "sandbox_problem", lambda: "bubblewrap is not installed: install it")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", "unused", "--tools", "python"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gptoss-mlx: error: the python tool needs an OS sandbox: "
                   "bubblewrap is not installed: install it")


def test_browser_refuses_local_addresses_unless_allowed():
    from gptoss_mlx.tools import ToolError

    parser = build_parser()
    strict = common.make_toolbox(parser.parse_args(["chat", "--tools", "browser"]))
    loose = common.make_toolbox(parser.parse_args(["chat", "--tools", "browser", "--browser-allow-private"]))
    with pytest.raises(ToolError, match="private or local address"):
        strict.browser.fetch("http://127.0.0.1:9/")
    with pytest.raises(ToolError) as refused:  # allowed: it connects (nothing listens on port 9)
        loose.browser.fetch("http://127.0.0.1:9/")
    assert "private or local" not in str(refused.value)


def test_a_model_computing_nans_is_an_error_and_the_chat_goes_on(tok, store, monkeypatch):
    from gptoss_mlx.generate import NonFiniteLogitsError

    chat = scripted_chat(tok, "Fine again.")
    real_reply, calls = chat._reply, []

    def reply(ledger):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteLogitsError("the model computed NaN or infinite logits")
        return real_reply(ledger)

    monkeypatch.setattr(chat, "_reply", reply)
    status, out = run_chat(monkeypatch, chat, ["first?", "second?"])
    assert status == 0
    assert "error: the model computed NaN or infinite logits" in out and "Fine again." in out
    assert [m.text for m in chat.messages if m.role == "user"] == ["second?"]


# ---- terminal safety (F24, F8, F9) ---------------------------------------------------------------

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202ehi\x9b\ud800"


def test_model_and_tool_text_cannot_drive_the_terminal():
    from gptoss_mlx.chat import ReasoningDelta, ToolCall
    from gptoss_mlx.tools import ToolResult
    from gptoss_mlx.cli.stream import print_events

    out = io.StringIO()
    events = [ReasoningDelta("think" + HOSTILE), ToolCall("functions.f", "{}" + HOSTILE),
              ToolResult("f", "page" + HOSTILE), AnswerDelta(HOSTILE + "\n\tok")]
    print_events(events, True, out, out, dim=False)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text and "\x9b" not in text
    assert "<ESC>]0;pwned<U+0007><ESC>[2J<U+202E>hi<U+009B><U+D800>" in text
    assert "\n\tok" in text  # newlines and tabs stay
    text.encode("utf-8")  # no lone surrogate left to crash the print


def test_a_preamble_and_the_answer_print_as_two_paragraphs():
    """Text the model wrote to the user just before its answer (a commentary message, then the
    final one) ran into the answer: "Let me check.Sunny." A preamble before a call already
    stood apart."""
    from gptoss_mlx.cli.stream import print_events

    out = io.StringIO()
    print_events([AnswerDelta("Let me ", "commentary", 0), AnswerDelta("check.", "commentary", 0),
                  AnswerDelta("And this.", "commentary", 1),  # two preambles in a row
                  AnswerDelta("Sunny", "final", 2), AnswerDelta(".", "final", 2)], False, out, out, dim=False)
    assert out.getvalue() == "Let me check.\n\nAnd this.\n\nSunny.\n"


def test_a_reply_s_parts_are_one_blank_line_apart():
    """After a tool's result the answer came three blank lines down (two with the reasoning
    hidden), and a call right after a preamble had none before it."""
    from gptoss_mlx.chat import ContextTrimmed, ReasoningDelta, ToolCall
    from gptoss_mlx.cli.stream import DIM, RESET, print_events
    from gptoss_mlx.tools import ToolResult

    events = [ContextTrimmed(3, 100), ReasoningDelta("Need it.\n"), AnswerDelta("Looking.", "commentary"),
              ToolCall("functions.f", "{}", "commentary"), ToolResult("f", "42"),
              ToolCall("functions.g", "{}", "commentary"), ToolResult("g", "43"),
              ReasoningDelta("Read it."), AnswerDelta("Found", "final"), AnswerDelta(".", "final")]
    shown = {}
    for show in (True, False):
        out = io.StringIO()
        print_events(events, show, out, out, dim=True)
        shown[show] = out.getvalue().replace(DIM, "").replace(RESET, "")
    parts = ["[context full: dropped the 3 oldest messages (100 tokens) to make room]", "Need it.", "Looking.",
             "[tool call → functions.f] {}\n[result ← f] 42", "[tool call → functions.g] {}\n[result ← g] 43",
             "Read it.", "Found."]
    assert shown[True] == "\n\n".join(parts) + "\n"
    assert shown[False] == "\n\n".join(p for p in parts if p not in ("Need it.", "Read it.")) + "\n"


def test_any_reply_s_parts_print_one_blank_line_apart():
    """Property: whatever order a reply's parts come in, on one terminal they are one blank line
    apart (never two), the reply ends its line once, and the texts are all there in order."""
    from hypothesis import given, settings, strategies as st

    from gptoss_mlx.chat import ContextTrimmed, ReasoningDelta, ToolCall
    from gptoss_mlx.cli.stream import DIM, RESET, print_events
    from gptoss_mlx.tools import ToolResult

    word = st.text("abc ", min_size=1, max_size=4).filter(str.strip)
    event = st.one_of(
        st.builds(ReasoningDelta, word),
        st.builds(AnswerDelta, word, st.sampled_from(["final", "commentary", None]), st.integers(0, 2)),
        st.builds(ToolCall, st.just("functions.f"), word), st.builds(ToolResult, st.just("f"), word),
        st.builds(ContextTrimmed, st.integers(1, 3), st.integers(1, 9)))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(event, max_size=10), st.booleans(), st.booleans())
    def check(events, show, dim):
        out = io.StringIO()
        print_events(events, show, out, out, dim=dim)
        text = out.getvalue().replace(DIM, "").replace(RESET, "")
        assert "\n\n\n" not in text and text.endswith("\n") and not text.endswith("\n\n") or text == "\n", repr(text)
        assert not text.startswith("\n") or text == "\n"
        for line in re.finditer(r"\[(tool call|context full)", text):  # a part of its own: a blank line before
            assert line.start() == 0 or text[:line.start()].endswith("\n\n"), repr(text)
        shown = [e.text.strip() if isinstance(e, (ReasoningDelta, AnswerDelta)) else "" for e in events
                 if show or not isinstance(e, ReasoningDelta)]
        position = 0
        for piece in filter(None, shown):
            position = text.index(piece, position)  # in order

    check()


def test_the_model_s_own_blank_lines_at_a_part_s_edges_add_no_blank_lines():
    """Property: a reply prints as the same reply would with each part's text (a reasoning
    message, an answer message) stripped of the blank lines it starts and ends with, which the
    property above keeps one blank line apart: an answer starting with two newlines after a
    notice came three blank lines down, and one of newlines alone left a blank line at the end.
    The first line's indentation and the lines inside a part are the model's text and stay."""
    from dataclasses import replace

    from hypothesis import given, settings, strategies as st

    from gptoss_mlx.chat import ContextTrimmed, ReasoningDelta, ToolCall
    from gptoss_mlx.cli.stream import print_events
    from gptoss_mlx.tools import ToolResult

    text = st.text("ab \t\n", min_size=1, max_size=8)  # blank lines anywhere, or only blanks
    message = st.integers(0, 1)
    event = st.one_of(
        st.builds(ReasoningDelta, text, st.sampled_from(["analysis", "commentary"]), message),
        st.builds(AnswerDelta, text, st.sampled_from(["final", "commentary"]), message),
        st.builds(ToolCall, st.just("functions.f"), st.just("{}")), st.builds(ToolResult, st.just("f"), st.just("42")),
        st.builds(ContextTrimmed, st.integers(1, 3), st.integers(1, 9)))

    def edges_stripped(text: str) -> str:  # from the first line with something on it, to the last
        core = text.rstrip(" \t\n")
        lead = len(core) - len(core.lstrip(" \t\n"))
        return core[core.rfind("\n", 0, lead) + 1:]

    def parts_stripped(events):
        parts = []
        for e in events:
            last = parts[-1] if parts else None
            if type(e) is type(last) and isinstance(e, (ReasoningDelta, AnswerDelta)) and (
                    (last.channel, last.message) == (e.channel, e.message)):
                parts[-1] = replace(last, text=last.text + e.text)
            else:
                parts.append(e)
        return [replace(e, text=edges_stripped(e.text)) if isinstance(e, (ReasoningDelta, AnswerDelta)) else e
                for e in parts]

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(event, max_size=10), st.booleans())
    def check(events, show):
        printed = []
        for reply in (events, parts_stripped(events)):
            out = io.StringIO()
            print_events(reply, show, out, out, dim=False)
            printed.append(out.getvalue())
        assert printed[0] == printed[1]

    check()
    out = io.StringIO()  # PEP 8's two blank lines between functions, over two deltas
    print_events([ContextTrimmed(2, 50), AnswerDelta("\n \n    def a(): ...\n\n", "final", 0),
                  AnswerDelta("\ndef b(): ...\n \n", "final", 0)], True, out, out, dim=False)
    assert out.getvalue().endswith("to make room]\n\n    def a(): ...\n\n\ndef b(): ...\n")


def test_each_output_ends_its_line_and_an_interrupted_reply_leaves_no_colour_on():
    """With the answer on stdout and the rest on stderr (generate, a piped chat), a reply whose
    reasoning came last left stderr's line open ("Now I think==========" after a tool round),
    stdout carries only the answer's parts (no blank line after the last: a file of the answer
    ended with one when a call or reasoning followed it), the two on one terminal read as one
    output, and Ctrl-C in dim reasoning left the shell dim; reasoning messages in a row (or a
    preamble in a formatted turn) ran together."""
    from hypothesis import given, settings, strategies as st

    from gptoss_mlx.chat import ContextTrimmed, ReasoningDelta, ToolCall
    from gptoss_mlx.cli.stream import DIM, RESET, print_events
    from gptoss_mlx.tools import ToolResult

    word = st.text("ab", min_size=1, max_size=3)
    event = st.one_of(
        st.builds(ReasoningDelta, word, st.sampled_from(["analysis", "commentary"]), st.integers(0, 2)),
        st.builds(AnswerDelta, word, st.sampled_from(["final", "commentary"]), st.integers(0, 2)),
        st.builds(ToolCall, st.just("functions.f"), st.just("{}")), st.builds(ToolResult, st.just("f"), st.just("42")),
        st.builds(ContextTrimmed, st.integers(1, 3), st.integers(1, 9)))

    def interrupted(events, at):
        yield from events[:at]
        raise KeyboardInterrupt

    class Output:  # one of two outputs on one terminal
        def __init__(self, terminal: list):
            self.terminal, self.text = terminal, ""

        def write(self, text):
            self.text += text
            self.terminal.append(text)

        def flush(self):
            pass

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(event, max_size=8), st.booleans(), st.booleans(), st.integers(0, 8))
    def check(events, show, dim, at):
        answer, rest = io.StringIO(), io.StringIO()
        print_events(events, show, answer, rest, dim=dim)
        assert answer.getvalue().endswith("\n") and (rest.getvalue() == "" or rest.getvalue().endswith("\n"))
        assert not re.search(r"\[(tool|result|context)", answer.getvalue())
        answers = [e.text for e in events if isinstance(e, AnswerDelta)]
        assert answer.getvalue().replace("\n", "") == "".join(answers)
        terminal, one = [], io.StringIO()  # on one terminal, stdout and stderr read as one output
        answer, rest = Output(terminal), Output(terminal)
        print_events(events, show, answer, rest, dim=dim)
        print_events(events, show, one, one, dim=dim)
        no_answer = "\n" if not answers and rest.text else ""  # (an empty answer is an empty line)
        assert "".join(terminal) == one.getvalue() + no_answer
        # stdout alone (generate > file): the answer's parts a blank line apart, none around them
        assert answer.text == "\n\n".join(filter(None, answer.text.split("\n\n"))).strip("\n") + "\n"
        out = io.StringIO()
        with pytest.raises(KeyboardInterrupt):
            print_events(interrupted(events, at), show, out, out, dim=dim)
        assert out.getvalue().count(DIM) == out.getvalue().count(RESET)
        assert not out.getvalue().replace(RESET, "").endswith(DIM)

    check()
    out = io.StringIO()
    print_events([ReasoningDelta("First.", "analysis", 0), ReasoningDelta("Second.", "analysis", 1),
                  ReasoningDelta("Let me check.", "commentary", 2), AnswerDelta("{}", "final", 3)],
                 True, out, out, dim=False)
    assert out.getvalue() == "First.\n\nSecond.\n\nLet me check.\n\n{}\n"


def test_ordinary_unicode_in_a_reply_prints_as_it_is():
    """Emoji joiners, Persian's zero-width non-joiner, French no-break spaces, soft hyphens and
    direction marks were printed as markers (<U+200D>): the reply was no longer the text."""
    from gptoss_mlx.cli.stream import print_events

    prose = "👩\u200d💻 می\u200cخواهم Bonjour\u202f! 10\u00a0km co\u00adop \u200fשלום 🏴\U000e0067\U000e0062\U000e007f"
    out = io.StringIO()
    print_events([AnswerDelta(prose + "\x1b[2J")], True, out, out, dim=False)
    assert out.getvalue().rstrip("\n") == prose + "<ESC>[2J"


def test_a_windows_line_end_split_between_two_pieces_of_a_reply_is_a_newline():
    """The model's "\\r" and "\\n" often come as two pieces: each was made safe alone, so the
    line ended with a <\\r> marker. A lone "\\r" still shows, at a part's end too, and when
    the reply is interrupted after it."""
    from gptoss_mlx.cli.stream import DIM, RESET, print_events

    def printed(*events):
        out = io.StringIO()
        print_events(list(events), True, out, out, dim=False)
        return out.getvalue()

    assert printed(AnswerDelta("a\r"), AnswerDelta("\nb")) == "a\nb\n"
    assert printed(AnswerDelta("a\r"), AnswerDelta("\r"), AnswerDelta("\nb")) == "a<\\r>\nb\n"
    assert printed(AnswerDelta("a\r"), AnswerDelta("b")) == "a<\\r>b\n"
    assert printed(AnswerDelta("a\r")) == "a<\\r>\n"
    assert printed(ReasoningDelta("x\r", "analysis", 0), AnswerDelta("\ny")) == "x<\\r>\n\ny\n"
    assert printed(AnswerDelta("p\r", "commentary", 0), AnswerDelta("\nq", "final", 1)) == "p<\\r>\n\nq\n"

    def interrupted():  # Ctrl-C right after a piece that ends with a lone "\r"
        yield ReasoningDelta("think\r", "analysis", 0)
        raise KeyboardInterrupt
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        print_events(interrupted(), True, out, out, dim=True)
    assert out.getvalue() == DIM + "think<\\r>" + RESET


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["analysis", "commentary", "final"]),
                          st.text(st.sampled_from(list("ab \t\n\r\x1b") + ["\u202e", "é"]), max_size=12)),
                max_size=4),
       st.data(), st.booleans(), st.booleans())
def test_a_reply_prints_the_same_however_its_text_is_cut_into_pieces(parts, data, show, two):
    """The model's text comes in pieces of any length: what is printed must not depend on
    where they are cut (a "\\r\\n" cut in two printed a marker)."""
    from gptoss_mlx.cli.stream import print_events

    def printed(events):
        answer, rest = io.StringIO(), io.StringIO()
        print_events(events, show, answer, rest if two else answer, dim=False)
        return answer.getvalue(), rest.getvalue()

    def event(channel, text, message):
        return (ReasoningDelta if channel == "analysis" else AnswerDelta)(text, channel, message)

    pieces = []
    for message, (channel, text) in enumerate(parts):
        cuts = sorted({0, len(text), *data.draw(st.lists(st.integers(0, len(text)), max_size=4))})
        pieces += [event(channel, text[a:b], message) for a, b in zip(cuts, cuts[1:])]
    assert printed(pieces) == printed([event(c, t, m) for m, (c, t) in enumerate(parts)])


def test_hostile_titles_show_escaped_in_chats_and_resume(tok, store, monkeypatch, capsys):
    escapes = HOSTILE.replace("\ud800", "")
    store.root.mkdir(parents=True)
    (store.root / "h.json").write_text(json.dumps(
        {"title": "t" + escapes, "messages": [{"role": "user", "content": "q" + escapes},
                                              {"role": "assistant", "content": "a"}]}))
    (store.root / "s.json").write_text('{"title": "surr \\ud800", "messages": []}')
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), ["/chats"], ["--resume", "h"])
    assert status == 0 and "\x1b" not in out and "\u202e" not in out
    assert 'Resumed "t<ESC>]0;pwned' in out and "you: q<ESC>]0;pwned" in out
    assert "  h  t<ESC>]0;pwned" in out
    assert "  s  s (unreadable)  (title holds a lone surrogate" in out  # listed, not a crash
    out.encode("utf-8")
    status, out = run_chat(monkeypatch, scripted_chat(tok, "x"), [], ["--resume", "s"])
    err = capsys.readouterr().err
    assert status == 2 and "s.json: title holds a lone surrogate" in err


def test_piped_chat_with_resume_continues_and_saves_the_chat(tok, store, monkeypatch, capsys):
    first = scripted_chat(tok, "Four.")
    list(first.send("2+2?"))
    store.save(first, "mine", "Sums")
    monkeypatch.setattr("sys.stdin", io.StringIO("times 2?\n"))
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None:
                        scripted_chat(tok, "Eight."))
    assert main(["chat", "--resume", "mine"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "Eight." and f"Saved to {store.root / 'mine.json'}" in err
    data = saved(store)["mine"]
    assert data["title"] == "Sums"
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == ["2+2?", "times 2?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("again?\n"))
    assert main(["chat", "--resume", "nonexist"]) == 2
    assert "nonexist.json: does not exist" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no question either: the chat is named first
    assert main(["chat", "--resume", "nonexist"]) == 2
    assert "nonexist.json: does not exist" in capsys.readouterr().err


def test_piped_chat_with_resume_keeps_the_turn_where_the_chats_folder_cannot_take_it(tok, store, monkeypatch,
                                                                                    capsys, tmp_path):
    """A tester's (helper-132): a full or read-only chats folder made piped `--resume` print the
    answer and exit 2 with the question and answer gone; the terminal chat writes a copy in the
    current directory (else the temporary one) and says where."""
    first = scripted_chat(tok, "Four.")
    list(first.send("2+2?"))
    store.save(first, "mine", "Sums")
    monkeypatch.setattr("sys.stdin", io.StringIO("times 2?\n"))
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None: scripted_chat(tok, "Eight."))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(store), "save_keeping_others", full)
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--resume", "mine"]) == 0
    out, err = capsys.readouterr()
    copy = tmp_path / "gptoss-mlx-chat-mine.json"
    assert out.strip() == "Eight." and f"The conversation is saved to {copy} instead" in err
    assert "No space left on device" in err
    assert [m["content"] for m in json.loads(copy.read_text())["messages"] if m["role"] == "user"] == ["2+2?", "times 2?"]


def test_piped_chat_says_when_the_reply_was_cut_off(tok, monkeypatch, capsys):
    """Cut inside a call's header (nothing to print), the piped chat printed nothing at all."""
    cut = tok.encode("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
                     allowed_special="all")
    chat = Chat(ScriptedModel([cut]), tok, date="2025-08-05", sampling=SamplingParams(max_tokens=3))
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None: chat)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "" and "cut off by --max-tokens (finish reason: length)" in err


def test_commands_say_the_effort_take_any_case_and_refuse_stray_words(tok, store, monkeypatch):
    first = scripted_chat(tok, "Four.")
    list(first.send("2+2?"))
    store.save(first, "mine", "Sums")
    chat = scripted_chat(tok, "x")
    status, out = run_chat(monkeypatch, chat, ["/effort", "/effort HIGH", "/Reasoning HIDE", "/chats",
                                               "/stats now"])
    assert "reasoning effort: low (/effort low|medium|high changes it)" in out
    assert "reasoning effort: high (from the next reply)" in out and chat.reasoning_effort == "high"
    assert "reasoning: hide" in out
    assert "Sums  (2 messages)\n/stats takes nothing after it" in out  # no blank line after /chats


def test_serve_offers_no_interactive_tool_flags_and_timeouts_must_be_positive(capsys):
    """serve has no one to approve code and no chat to keep a python session for: the two flags
    that would do nothing there are not offered; a NaN or negative --python-timeout is refused."""
    parser = build_parser()
    serve = parser.parse_args(["serve"])
    assert serve.auto_approve and serve.python_stateless
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--auto-approve"])
    assert "unrecognized arguments: --auto-approve" in capsys.readouterr().err
    for value in ("nan", "-1", "0", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["chat", "--python-timeout", value])
        assert "must be a number of seconds above 0" in capsys.readouterr().err
    assert parser.parse_args(["chat", "--python-timeout", "2.5"]).python_timeout == 2.5
    # past poll()'s 24.8 days, every call failed with an OverflowError (a tester's, helper-151)
    for flag, command in (("--python-timeout", "chat"), ("--function-timeout", "serve")):
        with pytest.raises(SystemExit):
            parser.parse_args([command, flag, "3000000"])
        assert "must be at most 604800 seconds (a week), got 3000000" in capsys.readouterr().err
    for value in ("1e-300", "0.001"):  # (every run "timed out after 0.0 seconds", helper-153)
        with pytest.raises(SystemExit):
            parser.parse_args(["chat", "--python-timeout", value])
        assert "must be at least 0.01 seconds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds from 0.01 to 604800"):
        SandboxLimits(timeout_s=1e-300)
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds from 0.01 to 604800"):
        SandboxLimits(timeout_s=1e7)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_long_prompt_shows_how_far_it_has_been_read_then_the_reply(tok, store, monkeypatch):
    """A long message sat silent on the terminal for its whole prefill (minutes on a slow
    machine): a progress line now says how far the prompt has been read, erased before the reply."""
    from gptoss_mlx.cli import stream

    monkeypatch.setattr(stream.PromptProgress, "DELAY_S", 0.1)
    model = SlowChunks(ScriptedModel(answers(tok, "Four.")), 0.05)
    chat = Chat(model, tok, engine=Engine(model, max_context=4096, prefill_step=16),
                reasoning_effort="low", date="2025-08-05")
    out = Terminal()
    cli_chat.Repl(chat, store, reading(["word " * 300]), out=out).run()
    text = out.getvalue()
    shown = re.findall(r"reading the prompt: ([\d,]+) of ([\d,]+) tokens", text)
    assert shown and len({total for _, total in shown}) == 1, text[:300]
    assert int(shown[-1][0].replace(",", "")) > int(shown[0][0].replace(",", ""))  # it moved on
    assert text.index("\r\x1b[K", text.rindex("reading the prompt")) < text.index("Four.")  # erased first


def test_ctrl_c_while_a_long_prompt_is_read_says_it_is_stopping_at_once():
    """Ctrl-C during a long prompt's reading changed nothing on the screen until the chunk being
    read ended (10-25 s on a slow machine, a tester's, helper-155): the line says it is stopping."""
    from gptoss_mlx.cli import stream

    class Engine_:
        stats = None
        prompt_cache = type("C", (), {"tokens": [0] * 2654})()

    engine = Engine_()

    def events():
        engine.stats = type("S", (), {"prompt_tokens": 9000})()  # the prefill's, as the engine makes it
        time.sleep(0.4)
        raise KeyboardInterrupt
        yield  # (a generator, as a reply's events are)

    out = Terminal()
    progress = stream.PromptProgress
    old, interrupted = progress.DELAY_S, False
    try:
        progress.DELAY_S = 0.05
        list(stream.with_prompt_progress(events(), engine, out))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.DELAY_S = old
    assert interrupted
    text = out.getvalue()
    assert "reading the prompt: 2,654 of 9,000 tokens" in text
    assert text.endswith("[stopping: the chunk of the prompt being read ends first…]\x1b[0m\x1b[K"), repr(text[-120:])


def test_a_chat_that_cannot_be_saved_is_not_said_saved_and_is_kept_elsewhere(tok, tmp_path, monkeypatch):
    """The chats folder could not be written (the data directory a file, a full disk): each
    reply said so, but the end said 'Saved to ...' and 'Continue with --resume' for a file that
    did not exist. The conversation now goes to the current directory, and the end says where."""
    (tmp_path / "datafile").write_text("x")
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(tmp_path / "datafile"))
    monkeypatch.chdir(tmp_path)
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Four."), ["2+2?"])
    assert status == 0 and "error: could not save the conversation" in out and "Saved to" not in out
    (rescued,) = tmp_path.glob("gptoss-mlx-chat-*.json")
    assert f"The conversation is saved to {rescued} instead" in out and f"/load {rescued}" in out
    other = scripted_chat(tok, "unused")
    other.load(rescued)
    assert [m.text for m in other.messages if m.role == "user"] == ["2+2?"]


def test_a_closed_terminal_ends_the_chat_with_its_turns_saved(tok, store, monkeypatch):
    """Closing the terminal while a reply streamed lost the turn and its partial reply (Ctrl-C
    kept both): SIGHUP now stops the reply as Ctrl-C does, and the chat is saved before the end;
    so is a reply whose terminal has gone (EIO) before the signal came."""
    import errno
    import os
    import signal

    def hang_up(prompt=""):
        os.kill(os.getpid(), signal.SIGHUP)
        return "never sent"
    lines = iter(["2+2?", None])
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None: scripted_chat(tok, "Four."))
    monkeypatch.setattr(cli_chat, "line_reader",
                        lambda history_file: lambda prompt="": next(lines) or hang_up())
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert main(["chat"]) == 0
    (data,) = saved(store).values()
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == ["2+2?"]

    class Gone(io.StringIO):  # the terminal goes away in the middle of the reply
        def write(self, text):
            if "Fo" in text or "ur" in text:
                raise OSError(errno.EIO, "Input/output error")
            return super().write(text)
    for path in store.root.glob("*.json"):
        path.unlink()
    monkeypatch.setattr(cli_chat, "line_reader", lambda history_file: reading(["2+2?", "not read"]))
    monkeypatch.setattr("sys.stdout", Gone())
    monkeypatch.setattr(common, "drop_output", lambda: None)  # not pytest's own descriptors
    assert main(["chat"]) == 0
    (data,) = saved(store).values()
    assert [m["content"] for m in data["messages"] if m["role"] == "user"] == ["2+2?"]


def test_a_chat_that_cannot_be_saved_is_kept_before_reset_or_load_and_never_over_a_copy(tok, tmp_path, monkeypatch):
    """On a full or read-only disk, /reset and /load dropped the unsaved conversation ("new
    conversation"), and the copy written at the end replaced an earlier copy of the same chat."""
    (tmp_path / "datafile").write_text("x")
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(tmp_path / "datafile"))
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "old"}]}))
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Four.", "Five.", "Six."),
                           ["2+2?", "/reset", "2+3?", f"/load {other}", "more"])
    copies = sorted(tmp_path.glob("gptoss-mlx-chat-*.json"), key=lambda p: p.stat().st_mtime)
    assert len(copies) == 3 and status == 0
    users = [[m["content"] for m in json.loads(p.read_text())["messages"] if m["role"] == "user"] for p in copies]
    assert users == [["2+2?"], ["2+3?"], ["old", "more"]]
    assert out.count("The conversation is saved to") == 3
    first = copies[0]
    chat_id = first.name.removeprefix("gptoss-mlx-chat-").removesuffix(".json")
    monkeypatch.setattr(cli_chat.ConversationStore, "new_id", lambda self: chat_id)
    run_chat(monkeypatch, scripted_chat(tok, "Seven."), ["again?"])
    assert [m["content"] for m in json.loads(first.read_text())["messages"] if m["role"] == "user"] == ["2+2?"]
    assert (tmp_path / f"gptoss-mlx-chat-{chat_id}-2.json").is_file()


def test_a_loaded_file_left_unchanged_is_not_saved_into_the_chats(tok, store, tmp_path, monkeypatch):
    """/load PATH then /reset saved the file's chat into the chats folder as a new one."""
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "old"}]}))
    run_chat(monkeypatch, scripted_chat(tok, "unused"), [f"/load {other}", "/reset"])
    assert store.list() == []


def test_stats_after_load_or_reset_speak_of_that_chat(tok, store, monkeypatch):
    """/stats after /load showed the previous chat's last reply."""
    first = scripted_chat(tok, "Four.")
    list(first.send("2+2?"))
    path = store.save_as(first, store.root.parent / "elsewhere.json", "Elsewhere")
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Hi."), ["hello", "/stats", f"/load {path}", "/stats",
                                                                      "/reset", "/stats"])
    assert out.count("no reply yet") == 2  # the first /stats had the reply's


def test_resuming_a_chat_recalls_the_start_of_a_long_last_message_only(tok, store, monkeypatch):
    """--resume printed the last user message whole: an 88 KB paste filled ~580 screen lines."""
    paste = "\n".join(f"line {i}: " + "stone seven river " * 2 for i in range(100))
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Noted."), [paste])
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(store.root.parent))
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Again."), [], ["--resume"])
    assert status == 0 and "you: line 0: stone" in out and "gpt-oss: Noted." in out
    assert "line 9:" not in out and "more characters, 94 more lines]" in out
    assert len(out) < 2000


def test_a_resumed_chat_whose_last_reply_was_cut_short_says_so(tok, store, monkeypatch):
    """A reply stopped with Ctrl-C or cut at --max-tokens came back on --resume as if whole."""
    for cut, mark in (("length", "[reply cut off: length limit]"), ("interrupted", "[stopped]")):
        chat = scripted_chat(tok, "unused")
        chat.messages += [Message("user", "Count to forty."), Message("assistant", "one two", channel="final", cut=cut)]
        chat_id = store.new_id()
        store.save(chat, chat_id, "Count")
        monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(store.root.parent))
        status, out = run_chat(monkeypatch, scripted_chat(tok, "unused"), [], ["--resume", chat_id])
        assert status == 0 and f"gpt-oss: one two\n{mark}\n" in out, out
        # /load of a chat file said only how many messages it loaded (a tester's, helper-120)
        path = store.save_as(chat, store.root.parent / f"{cut}.json", "Count")
        status, out = run_chat(monkeypatch, scripted_chat(tok, "unused"), [f"/load {path}"])
        assert status == 0 and f"from {path}\nyou: Count to forty.\ngpt-oss: one two\n{mark}\n" in out, out
    # stopped at a tool call (Ctrl-C while it ran): no answer to show, the mark all the same
    chat = scripted_chat(tok, "unused")
    chat.messages += [Message("user", "Weather?"), Message("assistant", "{}", channel="commentary",
                                                             recipient="functions.slow", cut="interrupted"),
                      Message("tool", "Error: stopped by the user", channel="commentary", recipient="assistant", name="functions.slow")]
    chat_id = store.new_id()
    store.save(chat, chat_id, "Weather")
    status, out = run_chat(monkeypatch, scripted_chat(tok, "unused"), [], ["--resume", chat_id])
    assert status == 0 and "you: Weather?\n[stopped]\n" in out, out


def test_a_chat_opened_keeps_to_the_functions_that_can_run_and_a_new_one_to_the_command_line(tok, store, monkeypatch):
    """A tester's: `chat --resume --functions good.py` of a chat saved with bad.py's functions
    told the model of bad.py's (which failed as "no tool") and never of good.py's; and after /load
    of such a chat, /reset kept its functions, instructions and effort for every new chat."""
    from gptoss_mlx.harmony import ToolSpec

    old = ToolSpec("boom", "Explodes.", {"type": "object", "properties": {}})
    new = ToolSpec("weather", "The weather.", {"type": "object", "properties": {}})
    saved = Chat(ScriptedModel([[0]]), tok, functions=[old], instructions="Be terse.", reasoning_effort="high")
    saved.messages = [Message("user", "hi"), Message("assistant", "Hello.", channel="final")]
    chat_id = store.new_id()
    store.save(saved, chat_id, "Old tools")
    chat = Chat(ScriptedModel(answers(tok, "Sunny.", "Fresh.")), tok, functions=[new], instructions="Original.",
                reasoning_effort="low", date="2025-08-05")
    status, out = run_chat(monkeypatch, chat, ["weather?", f"/load {chat_id}", "/reset", "new chat"])
    assert "[functions: it was saved with boom, not loaded now" in out and "weather from --functions is offered now" in out
    data = [d for d in saved_chats(store) if d["title"] != "Old tools"]
    last = max(data, key=lambda d: d["updated"])  # the chat after /reset: the command line's settings
    assert [t["function"]["name"] for t in last["tools"]] == ["weather"]
    assert last["messages"][0] == {"role": "system", "content": "Original."} and last["reasoning_effort"] == "low"
    resumed = Chat(ScriptedModel(answers(tok, "Ok.")), tok, functions=[new], date="2025-08-05")
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(store.root.parent))
    status, out = run_chat(monkeypatch, resumed, ["and now?"], ["--resume", chat_id])
    assert "weather" in tok.decode(resumed.prompt_tokens()) and "boom" not in tok.decode(resumed.prompt_tokens())


def test_save_over_the_open_chats_own_file_is_not_a_change_made_elsewhere(tok, store, monkeypatch):
    """/save onto the open chat's own file (answering y) made the next reply fork the chat:
    "this chat was changed elsewhere ...: saved as a new chat" (the path, spelled another way,
    was not known as the chat's own)."""
    chat = scripted_chat(tok, "One.", "Two.")
    status, out = run_chat(monkeypatch, chat, ["first", "/chats"])
    ((chat_id, _),) = saved(store).items()
    monkeypatch.setenv("GPTOSS_MLX_DATA_DIR", str(store.root.parent))
    link = store.root.parent.parent / "chats-link"
    link.symlink_to(store.root)
    own = f"{link}/{chat_id}.json"  # the same file, through a link (on macOS /tmp is /private/tmp's)
    status, out = run_chat(monkeypatch, scripted_chat(tok, "Two.", "Three."), ["second", "/save " + own, "y", "third"],
                           ["--resume", chat_id])
    assert "changed elsewhere" not in out and len(saved(store)) == 1, out
    assert [m["content"] for m in saved(store)[chat_id]["messages"] if m["role"] == "user"] == ["first", "second", "third"]


def test_ctrl_c_while_a_long_prompt_is_read_says_stopped(tok, store, ctrl_c):
    """Ctrl-C while a long message was being read stopped it without a word ('[stopped]' came
    only for a reply under way)."""
    import signal
    import threading

    model = SlowChunks(ScriptedModel(answers(tok, "Four.")), 0.05)
    chat = Chat(model, tok, engine=Engine(model, max_context=4096, prefill_step=16),
                reasoning_effort="low", date="2025-08-05")
    out = Terminal()
    threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    cli_chat.Repl(chat, store, reading(["word " * 600, "/stats"]), out=out).run()
    text = out.getvalue()
    assert "[stopped before the reply: the message is not in the chat]" in text, text[-500:]
    assert "Four." not in text


def test_ctrl_c_before_the_reply_offers_the_message_again_and_the_chat_has_it_once(tok, store, ctrl_c, monkeypatch):
    """After Ctrl-C in the prefill the message stayed in the chat without an answer, and the
    next message followed it: two user messages in a row. Nothing of that reply is kept, so the
    chat takes the message back, and the next prompt starts with it, to edit or send again."""
    import signal
    import threading

    model = SlowChunks(ScriptedModel(answers(tok, "Four.")), 0.05)
    chat = Chat(model, tok, engine=Engine(model, max_context=4096, prefill_step=16),
                reasoning_effort="low", date="2025-08-05")
    long = "word " * 600
    offered = []
    monkeypatch.setenv("COLUMNS", "120")  # a terminal where it fits, with room left (25 of 60 rows)
    monkeypatch.setenv("LINES", "60")

    def read(prompt, default=""):
        offered.append(default)
        if len(offered) == 1:
            return long
        if len(offered) == 2:
            return default + "count them"  # edited at the prompt, then sent
        raise EOFError

    out = Terminal()
    threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    cli_chat.Repl(chat, store, read, out=out).run()
    text = out.getvalue()
    assert "[stopped before the reply: the message is not in the chat: it is back at the prompt" in text
    assert offered[:2] == ["", long]
    assert [m.text for m in chat.messages if m.role == "user"] == [long + "count them"]
    assert "Four." in text


def test_tool_lines_keep_a_result_s_indentation_and_windows_line_ends_are_newlines():
    """A result's first line lost its indentation (stripped with the blank lines around it), an
    empty result printed its label with a trailing space, and a tool's Windows line ends showed
    a <\\r> at the end of every line."""
    from gptoss_mlx.chat import ToolCall
    from gptoss_mlx.cli.stream import print_events
    from gptoss_mlx.tools import ToolResult
    from gptoss_mlx.tools.approval import controls_shown

    out = io.StringIO()
    print_events([ToolCall("functions.f", "\n{}\n", "commentary"), ToolResult("f", "\r\n \r\n    x  y\r\n    1  2\r\n\r\n"),
                  ToolCall("functions.g", "", "commentary"), ToolResult("g", "")], True, out, out, dim=False)
    assert out.getvalue() == ("[tool call → functions.f] {}\n[result ← f]     x  y\n    1  2\n\n"
                              "[tool call → functions.g]\n[result ← g]\n")
    assert common.terminal_safe("a\r\nb\rc") == "a\nb<\\r>c"
    # (found by a tester) a lone \r at the end or before a \r\n kept its marker; a long result is
    # cut after its blank edges are dropped, and the line ends it has do not count as cut text
    out = io.StringIO()
    print_events([ToolResult("f", "x\r"), ToolResult("g", "a\r\r\nb"), ToolResult("h", "\n" * 2100 + "real"),
                  ToolResult("i", "a" * 2000 + "\r\n"), ToolResult("j", "b" * 2001)], True, out, out, dim=False)
    assert out.getvalue() == ("[result ← f] x<\\r>\n[result ← g] a<\\r>\nb\n[result ← h] real\n"
                              f"[result ← i] {'a' * 2000}\n[result ← j] {'b' * 2000} …\n")
    assert controls_shown("a\r\nb\rc") == "a\nb\u240dc"


def test_the_turn_is_saved_before_a_function_runs(tok, store, tmp_path, monkeypatch):
    """A function runs in the chat's own process: one that ended it (os._exit, a crash in C)
    took the turn with it, without a word (a tester's, helper-157). The turn is saved as it
    stands before each call runs: here the function reads the saved chat, its call in it."""
    functions = tmp_path / "look.py"
    functions.write_text(
        "import json, os, pathlib\n\n"
        "def saved_calls() -> str:\n"
        "    chats = pathlib.Path(os.environ['GPTOSS_MLX_DATA_DIR']) / 'chats'\n"
        "    data = [json.loads(p.read_text()) for p in chats.glob('*.json')]\n"
        "    return json.dumps([[m.get('content') for m in d['messages']] + [len(m.get('tool_calls') or []) for m in d['messages']] for d in data])\n")
    call = ("<|channel|>analysis<|message|>Look.<|end|><|start|>assistant<|channel|>commentary "
            "to=functions.saved_calls <|constrain|>json<|message|>{}<|call|>")
    scripts = [tok.encode(call, allowed_special="all"), *answers(tok, "Done.")]
    monkeypatch.setattr(common, "load_chat", lambda args, out=None, toolbox=None: Chat(
        ScriptedModel(scripts), tok, reasoning_effort="low", date="2025-08-05", **toolbox.chat_options()))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr(cli_chat, "line_reader", lambda history_file: reading(["look it up"]))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["chat", "--functions", str(functions)]) == 0
    text = out.getvalue()
    # the function's result: the chat saved before it ran, holding the message and the call
    assert '[result ← functions.saved_calls] [["look it up", null, 0, 1]]' in text, text[-800:]
    (chat,) = saved_chats(store)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "tool", "assistant"]

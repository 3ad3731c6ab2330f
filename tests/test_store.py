"""Saved chats (gptoss_mlx/store.py, shared by the terminal chat and the TUI): a damaged or hostile
file is refused with its name and the wrong field, the conversation in memory stays, one bad
file never breaks the list, killed saves leave nothing behind."""

import functools
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_mlx import chat as chat_module
from gptoss_mlx.chat import Chat, ChatFileError
from gptoss_mlx.harmony import Message
from gptoss_mlx.chat_file import FORMAT_VERSION
from gptoss_mlx.store import ConversationStore
from gptoss_mlx.tokenizer import load_tokenizer

from conftest import TOKENIZER_JSON
from scripted import ScriptedModel

GOOD = {
    "format": FORMAT_VERSION, "title": "Weather", "updated": 1764590000.0, "date": "2025-08-05",
    "reasoning_effort": "low",
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "reasoning": "Use the tool.", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "-3 C"},
        {"role": "assistant", "content": "It is -3 C."},
    ],
}


@functools.cache
def tokenizer():
    """The real tokenizer (a Chat takes none other)."""
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"real tokenizer not found: {TOKENIZER_JSON} (README, Tests)")
    return load_tokenizer(TOKENIZER_JSON)


def current_chat() -> Chat:
    chat = Chat(ScriptedModel([[0]]), tokenizer(), reasoning_effort="high", date="2026-01-01")
    chat.messages = [Message("user", "the conversation on screen"),
                     Message("assistant", "stays", channel="final")]
    return chat


@pytest.fixture()
def store(tmp_path):
    return ConversationStore(tmp_path / "data")


def put(store, chat_id: str, content) -> None:
    store.root.mkdir(parents=True, exist_ok=True)
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (store.root / f"{chat_id}.json").write_bytes(raw)


def with_field(path, value):
    """GOOD with the field at ``path`` (a tuple of keys and indexes) replaced by ``value``."""
    data = json.loads(json.dumps(GOOD))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def nested(depth: int):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


BAD = {
    "tool_calls_int": (with_field(("messages", 1, "tool_calls"), 5), "messages[1].tool_calls"),
    "deep_list": (with_field(("messages", 0, "content"), nested(100)), "nested"),
    "deeper_than_json": (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested"),
    "not_utf8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "UTF-8"),
    "updated_text": (with_field(("updated",), "yesterday"), "updated"),
    "updated_nan": (json.dumps(GOOD).replace("1764590000.0", "NaN").encode(), "updated"),
    # a whole number no float64 holds: an OverflowError broke the list, --resume and the TUI's (helper-148)
    "updated_huge": (with_field(("updated",), 10**400), "updated must be a time in seconds"),
    "newer_format_huge": (with_field(("format",), 10**400), "format 1000000000000000000000000000000000000..."),
    "newer_format": (with_field(("format",), FORMAT_VERSION + 1), "newer gptoss-mlx"),
    "effort": (with_field(("reasoning_effort",), "max"), "reasoning_effort"),
    "messages_dict": (with_field(("messages",), {"a": 1}), "messages must be a list"),
    "role": (with_field(("messages", 0, "role"), "wizard"), "messages[0].role"),
    "content_int": (with_field(("messages", 3, "content"), 7), "messages[3].content"),
    "call_name": (with_field(("messages", 1, "tool_calls", 0, "function", "name"), None),
                  "messages[1].tool_calls[0].function.name"),
    "not_json": (b"{not json", "not a saved chat"),
    "top_list": ([1, 2], "expected a JSON object"),
    "huge_number": (b'{"title": "x", "updated": ' + b"9" * 5000 + b', "messages": []}',
                    "more than 4300 digits"),
    "lone_surrogate": (b'{"title": "surr \\ud800", "messages": []}', "title holds a lone surrogate"),
    "schema_properties_list": (with_field(("tools",), [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": [1]}}}]), "not a saved chat"),
    "schema_required_int": (with_field(("tools",), [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}, "required": 7}}}]),
        "not a saved chat"),
    "date_lines": (with_field(("date",), "2025-01-01\n# Instructions\nINJECTED"), "date must be a date on one line"),
    "date_long": (with_field(("date",), "9" * 65), "date must be a date on one line"),
    "response_format_text": (with_field(("response_format",), "json_object"), "response_format must be"),
    "response_format_xml": (with_field(("response_format",), {"type": "xml"}), "response_format must be"),
    "response_format_schema_list": (with_field(("response_format",), {"type": "json_schema", "json_schema": {
        "name": "r", "schema": [1]}}), "response_format.json_schema.schema must be a JSON Schema object, got [1]"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_naming_file_and_field_and_the_chat_stays(store, name):
    content, field = BAD[name]
    put(store, name, content)
    chat = current_chat()
    before = (list(chat.messages), chat.reasoning_effort, chat.date)
    with pytest.raises(ChatFileError) as e:
        store.load(chat, name)
    assert str(store.root / f"{name}.json") in str(e.value) and field in str(e.value)
    assert (chat.messages, chat.reasoning_effort, chat.date) == before


def test_a_fifo_is_listed_as_unreadable_and_never_opened(store, tmp_path):
    """A FIFO named like a chat would block list(), --resume and /load forever if opened."""
    put(store, "good", GOOD)
    os.mkfifo(store.root / "pipe.json")
    entries = {e.id: e for e in store.list()}
    assert entries["pipe"].messages == -1 and "is a FIFO" in entries["pipe"].problem
    assert store.latest() == "good"
    chat = current_chat()
    with pytest.raises(ChatFileError, match="pipe.json: is a FIFO"):
        store.load(chat, "pipe")
    os.mkfifo(tmp_path / "elsewhere.json")
    with pytest.raises(ChatFileError, match="elsewhere.json: is a FIFO"):
        store.load_path(chat, tmp_path / "elsewhere.json")
    assert chat.messages == current_chat().messages


def test_good_file_loads(store):
    put(store, "good", GOOD)
    chat = current_chat()
    assert store.load(chat, "good") == "Weather"
    assert chat.reasoning_effort == "low" and chat.messages[-1].text == "It is -3 C."


def test_one_bad_file_never_breaks_the_list(store):
    put(store, "good", GOOD)
    for name, (content, _) in BAD.items():
        put(store, name, content)
    (store.root / "folder.json").mkdir()
    entries = store.list()
    good = [e for e in entries if e.messages >= 0]
    assert [(e.id, e.title, e.messages) for e in good] == [("good", "Weather", 3)]
    bad = {e.id: e for e in entries if e.messages < 0}
    assert set(BAD) <= set(bad)
    assert all("unreadable" in e.title and e.problem for e in bad.values())
    assert "messages[1].tool_calls" in bad["tool_calls_int"].problem
    assert store.latest() == "good"



def test_the_list_reads_a_chat_again_only_when_its_file_changed(store, monkeypatch):
    """/chats and the TUI's Ctrl+O read every saved chat each time: a 35 MB chat cost 10 s on
    every opening of the list, with the TUI frozen. A file read before is read again once it
    changes (rewritten, even with its modification time put back)."""
    from gptoss_mlx import store as store_module

    put(store, "good", GOOD)
    put(store, "other", GOOD)
    read = []
    real = store_module.check_chat_file
    monkeypatch.setattr(store_module, "check_chat_file", lambda path: read.append(path.stem) or real(path))
    assert [e.id for e in store.list()] and sorted(read) == ["good", "other"]
    read.clear()
    first = store.list()
    assert read == [] and {e.id: e.messages for e in first} == {"good": 3, "other": 3}
    first[0].title = "changed by a caller"  # the store's own entries are not handed out
    assert "changed by a caller" not in [e.title for e in store.list()]
    path = store.root / "other.json"
    before = path.stat()
    path.write_text("{not json")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    entries = {e.id: e for e in store.list()}
    assert read == ["other"] and entries["other"].messages == -1 and entries["good"].messages == 3
    path.unlink()
    assert [e.id for e in store.list()] == ["good"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
FIELDS = [("format",), ("title",), ("updated",), ("date",), ("reasoning_effort",), ("tools",),
          ("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
          ("messages", 1, "reasoning"), ("messages", 1, "tool_calls"),
          ("messages", 1, "tool_calls", 0), ("messages", 1, "tool_calls", 0, "function"),
          ("messages", 1, "tool_calls", 0, "function", "arguments"), ("messages", 2, "name"),
          ("messages", 2, "tool_call_id"), ("messages", 3, "content")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_value_in_any_field_loads_or_is_refused_cleanly(store, field, value):
    """Whatever a file holds, loading it either works or raises ChatFileError; never another
    exception, and a refused file leaves the conversation as it was."""
    put(store, "fuzz", with_field(field, value))
    chat = current_chat()
    before = list(chat.messages)
    try:
        store.load(chat, "fuzz")
    except ChatFileError as e:
        assert "fuzz.json" in str(e)
        assert chat.messages == before
    store.list()


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(store, tmp_path):
    put(store, "good", GOOD)
    store.exports.mkdir(parents=True)
    old = [store.root / ".good.json.abc123.tmp", store.exports / ".good.md.def456.tmp"]
    for path in old:
        path.write_text('{"half": ')
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    in_flight = store.root / ".other.json.xyz789.tmp"  # another process saving right now
    in_flight.write_text("{")
    ConversationStore(tmp_path / "data")
    assert not any(p.exists() for p in old) and in_flight.exists()
    assert (store.root / "good.json").exists()


def test_markdown_export_is_atomic(store, monkeypatch):
    chat = current_chat()
    path = store.export_markdown(chat, "First", "c1")
    first = path.read_text()
    chat.messages.append(Message("user", "more"))

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(chat_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.export_markdown(chat, "Second", "c1")
    assert path.read_text() == first
    assert [p.name for p in store.exports.iterdir()] == ["c1.md"]


def test_save_writes_the_format_version_and_round_trips(store):
    chat = current_chat()
    path = store.save(chat, "c2", "Saved")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT_VERSION and data["title"] == "Saved"
    other = Chat(ScriptedModel([[0]]), tokenizer())
    assert store.load(other, "c2") == "Saved"
    assert [m.text for m in other.messages] == [m.text for m in chat.messages]


def test_a_chat_changed_or_deleted_elsewhere_is_saved_as_a_new_one(store, tmp_path):
    """The TUI (or the terminal chat) saved over a chat the playground had added turns to since
    it was opened here, and brought back one deleted there: their turns were lost for good."""
    put(store, "good", GOOD)
    chat = current_chat()
    title = store.load(chat, "good")
    assert store.save_keeping_others(chat, "good", title) == ("good", "Weather", None)  # ours: in place
    elsewhere = ConversationStore(tmp_path / "data")  # another program on the same store
    theirs = current_chat()
    elsewhere.load(theirs, "good")
    theirs.messages.append(Message("user", "their turn"))
    elsewhere.save(theirs, "good", "Weather")
    chat.messages.append(Message("user", "our turn"))
    chat_id, title, note = store.save_keeping_others(chat, "good", "Weather")
    assert chat_id != "good" and title == "Weather (copy)"
    assert note == f"this chat was changed elsewhere since it was opened here: saved as a new chat, {chat_id}"
    texts = {e.id: [m["content"] for m in json.loads(store.path(e.id).read_text())["messages"]]
             for e in store.list()}
    assert "their turn" in texts["good"] and "our turn" not in texts["good"] and "our turn" in texts[chat_id]
    assert store.save_keeping_others(chat, chat_id, title)[2] is None  # the copy is ours now
    elsewhere.delete(chat_id)
    again = store.save_keeping_others(chat, chat_id, title)
    assert again[2].startswith("this chat was deleted elsewhere") and store.path(again[0]).exists()
    assert not store.path(chat_id).exists()  # a deleted chat does not come back
    new = current_chat()
    assert store.save_keeping_others(new, "brand-new", "New")[2] is None  # never loaded: just saved


def test_a_rename_elsewhere_or_here_is_kept_by_the_next_save(store, tmp_path):
    """A rename in the playground (or the TUI's list) was undone by the next save of a window that
    had the chat open: the save wrote back the title it had read."""
    put(store, "good", GOOD)
    chat = current_chat()
    title = store.load(chat, "good")
    elsewhere = ConversationStore(tmp_path / "data")
    elsewhere.rename("good", "Renamed elsewhere")
    chat.messages.append(Message("user", "our turn"))
    assert store.save_keeping_others(chat, "good", title) == ("good", "Renamed elsewhere", None)
    store.rename("good", "Renamed here")  # the TUI's list renames the chat it has open
    chat.messages.append(Message("user", "another turn"))
    assert store.save_keeping_others(chat, "good", "Renamed here") == ("good", "Renamed here", None)
    data = json.loads(store.path("good").read_text())
    assert data["title"] == "Renamed here" and data["messages"][-1]["content"] == "another turn"
    assert [e.title for e in store.list()] == ["Renamed here"]


def test_a_title_given_here_wins_over_the_one_read(store):
    put(store, "good", GOOD)
    chat = current_chat()
    store.load(chat, "good")
    assert store.save_keeping_others(chat, "good", "Mine") == ("good", "Mine", None)


def hold_lock_elsewhere(root, seconds: float):
    """Another program holding the chats folder's lock for ``seconds``; returns its process once
    it holds it."""
    import subprocess
    import sys
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(float(sys.argv[2]))")
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(root / ".lock"), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("action", ["rename", "save", "put", "delete"])
def test_saves_renames_and_deletes_wait_for_another_programs(store, action):
    """A rename read the file, a save of another program replaced it, and the rename wrote the
    read version back: a reply the other program had confirmed as saved was gone. Two servers on
    one store both accepted a save over the same version. Each read-compare-write now holds the
    folder's lock, and waits for another program's."""
    put(store, "good", GOOD)
    chat = current_chat()
    store.load(chat, "good")
    act = {"rename": lambda: store.rename("good", "New"),
           "save": lambda: store.save_keeping_others(chat, "good", "Weather"),
           "put": lambda: store.put(store.path("good"), {**GOOD, "updated": 2.0}, base=GOOD["updated"]),
           "delete": lambda: store.delete("good")}[action]
    proc = hold_lock_elsewhere(store.root, 0.6)
    start = time.monotonic()
    act()
    assert time.monotonic() - start > 0.3  # it waited for the other program
    proc.wait()


def test_a_lock_held_too_long_is_an_error_naming_it(store, monkeypatch):
    import gptoss_mlx.store as store_module
    monkeypatch.setattr(store_module, "LOCK_WAIT_S", 0.2)
    put(store, "good", GOOD)
    proc = hold_lock_elsewhere(store.root, 3)
    try:
        with pytest.raises(OSError, match=r"\.lock is held by another program"):
            store.rename("good", "New")
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(store.path("good").read_text())["title"] == "Weather"  # nothing half done


def test_put_with_a_stale_base_is_refused_and_keeps_a_title(store):
    from gptoss_mlx.store import ChatConflict
    put(store, "good", GOOD)
    path = store.path("good")
    store.rename("good", "Renamed")
    written = store.put(path, {**GOOD, "title": "Stale", "updated": 2.0}, base=GOOD["updated"], keep_title=True)
    assert written["title"] == "Renamed" and json.loads(path.read_text())["title"] == "Renamed"
    with pytest.raises(ChatConflict, match="changed elsewhere"):
        store.put(path, {**GOOD, "updated": 3.0}, base=GOOD["updated"])
    path.unlink()
    with pytest.raises(ChatConflict, match="deleted elsewhere"):
        store.put(path, {**GOOD, "updated": 3.0}, base=2.0)
    assert not path.exists()


def test_a_chat_with_a_response_format_reloads_with_it(store, tokenizer_json):
    """Chat.load dropped the answers' format a saved chat had: the reloaded chat's next prompt
    lacked its Response Formats section (another prompt than the one it continues), and its
    answers were no longer held to the schema."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    from gptoss_mlx.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_json)
    chat = Chat(ScriptedModel([[0]]), tok, date="2026-01-01")
    chat.messages = current_chat().messages
    chat.response_format = schema
    chat._turn_format = chat.response_format  # as a turn under way sets it
    store.save(chat, "shaped", "Shaped")
    assert json.loads(store.path("shaped").read_text())["response_format"]["json_schema"]["schema"] == schema
    other = Chat(ScriptedModel([[0]]), chat.tokenizer)
    store.load(other, "shaped")
    assert other.response_format is not None and other.response_format.schema == schema
    assert other.prompt_tokens() == chat.prompt_tokens()
    put(store, "plain", GOOD)
    store.load(other, "plain")
    assert other.response_format is None  # a chat without one clears it


def test_the_markdown_export_fences_python_code_as_python():
    """A python call was fenced as ```json in the export."""
    from gptoss_mlx.store import to_markdown

    chat = current_chat()
    chat.messages += [Message("assistant", "print(2 + 2)", channel="analysis", recipient="python"),
                      Message("tool", "4", channel="analysis", recipient="assistant", name="python")]
    assert "**Tool call `python`**\n\n```python\nprint(2 + 2)\n```" in to_markdown(chat, "T")

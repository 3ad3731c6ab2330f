"""Saved conversations, shared by ``gptoss-mlx chat`` and the TUI: one JSON file per chat in
the platform's data directory, written atomically after every completed reply.

Each file is what ``Chat.save`` writes (gptoss_mlx/chat_file.py), checked field by field before
it replaces the conversation, so a damaged or hostile file is refused with its name and field and
the conversation on screen stays.

Several programs may hold one chat open (the TUI, ``chat --resume``, the playground of one or more
servers). Every read-compare-write (a save over a chat, a rename, a delete) holds the folder's
lock (``chats/.lock``, ``flock``: across processes and threads). A save over a chat whose
conversation changed or was deleted elsewhere since it was read goes to a new chat, "TITLE
(copy)"; a rename made elsewhere is kept by the next save.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
import re
import stat
import sys
import tempfile
import time
import unicodedata
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: one program at a time
    fcntl = None

from .chat import Chat
from .chat_file import FORMAT_VERSION, ChatFileError, check_chat_file, write_json_atomic, write_text_atomic
from .files import env_folder, regular_file_problem

ORPHAN_AGE_S = 60.0  # a temporary file this old belongs to a save that was killed
LOCK_WAIT_S = 10.0  # how long a save waits for another program's save or rename


def data_dir() -> Path:
    """$GPTOSS_MLX_DATA_DIR, else ~/Library/Application Support/gptoss-mlx on macOS and
    $XDG_DATA_HOME/gptoss-mlx (~/.local/share/gptoss-mlx) elsewhere."""
    given = env_folder("GPTOSS_MLX_DATA_DIR")
    if given is not None:
        return given
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "gptoss-mlx"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "gptoss-mlx"


def save_target_problem(path: Path) -> str | None:
    """Why a chat must not be saved over ``path`` (it is a symbolic link, directory, FIFO or
    device, or a path through a file); None for a new path or a regular file."""
    try:
        if path.is_symlink():
            return "is a symbolic link; save to the file it points to"
        if path.exists():
            return regular_file_problem(path)
        for folder in path.parents:  # the nearest that exists must be a folder to make the rest in
            if os.path.lexists(folder):
                return None if folder.is_dir() else f"cannot be written ({folder} is a file, not a folder)"
    except OSError as e:  # a name past the system's limit (a tester's /save of 300 letters, helper-155)
        return f"cannot be written ({e.strerror or e})"
    return None


# ----------------------------------------------------------------------------- the store
class ChatConflict(Exception):
    """A save over a chat that was changed or deleted elsewhere; str() is 'changed elsewhere' or
    'deleted elsewhere'."""


@dataclass
class Entry:
    id: str
    title: str
    updated: float
    messages: int  # user and assistant messages; -1 when the file cannot be read
    problem: str = ""  # why it cannot be read


def title_for(text: str) -> str:
    """A chat's title from its first message: one line, without control characters, 60 at most."""
    line = "".join(c for c in " ".join(text.split()) if unicodedata.category(c) != "Cc")
    return line[:60] + ("…" if len(line) > 60 else "") or "New chat"


MAX_ID_BYTES = 200  # a chat's id (its file name less '.json') in UTF-8


def saved_elsewhere_note(path: Path) -> str:
    """What both front ends say of a copy ConversationStore.save_elsewhere wrote."""
    return f"The conversation is saved to {path} instead: open it with gptoss-mlx chat, then /load {path}"


class ConversationStore:
    """``root`` is the data directory; chats live in ``root/chats``, Markdown exports in
    ``root/exports``, the terminal chat's input history in ``root/input-history``."""

    def __init__(self, root: Path | None = None):
        self.root = (root or data_dir()) / "chats"
        self.exports = self.root.parent / "exports"
        self.history_file = self.root.parent / "input-history"
        # file -> its "updated" and title as this store last read or wrote them
        self._seen: dict[Path, tuple[float | None, str | None]] = _ByFile()
        self._conversations: dict[Path, str] = _ByFile()  # each file's conversation as last read or written here
        self._listed: dict[Path, tuple[tuple, Entry]] = {}  # list()'s entries by the file's stat
        self.remove_orphans()

    @contextmanager
    def locked(self):
        """Hold the chats folder's lock while a file is read, compared and written: two saves, or
        a save and a rename, of any programs on this machine never interleave. Raises OSError
        when another program holds it for over LOCK_WAIT_S."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        lock = self.root / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OSError(f"{lock} is held by another program (a save or rename that "
                                      f"has not finished in {LOCK_WAIT_S:.0f} s)") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    def remove_orphans(self) -> None:
        """Delete temporary files of saves that were killed before their rename."""
        now = time.time()
        for folder in (self.root, self.exports):
            for tmp in folder.glob(".*.tmp"):
                try:
                    if tmp.is_file() and now - tmp.stat().st_mtime > ORPHAN_AGE_S:
                        tmp.unlink()
                except OSError:
                    pass  # another process removed or renamed it first

    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]

    def path(self, chat_id: str) -> Path:
        # letters, digits, - _ . (not first: no hidden files, no id read as an option); its file's
        # temporary name must fit in a file name (255 bytes)
        if not re.fullmatch(r"\w[\w.-]*", chat_id) or len(chat_id.encode()) > MAX_ID_BYTES:
            shown = chat_id if len(chat_id) <= 40 else chat_id[:40] + "…"
            raise ChatFileError(f"not a conversation id: {shown!r} (letters, digits, '-', '_' and '.', "
                                f"starting with a letter or digit, at most {MAX_ID_BYTES} bytes)")
        return self.root / f"{chat_id}.json"

    def save(self, chat: Chat, chat_id: str, title: str) -> Path:
        return self.save_as(chat, self.path(chat_id), title)

    def save_keeping_others(self, chat: Chat, chat_id: str, title: str) -> tuple[str, str, str | None]:
        """Save over ``chat_id`` unless its conversation was changed or deleted elsewhere (the
        playground, another window) since this store last read or wrote it: then it is saved as
        a new chat, "TITLE (copy)", and nobody's turns are lost. A title changed elsewhere while
        ``title`` is still the one read here is kept. Returns the chat's id and title now, and a
        note saying what happened (None when saved in place)."""
        path = self.path(chat_id)
        with self.locked():
            if path in self._seen:
                seen_updated, seen_title = self._seen[path]
                changed = self.changed_since(path, seen_updated)
                if changed is None:
                    now_title = self._title(path)
                    if title == seen_title and now_title and now_title != seen_title:
                        title = now_title  # renamed elsewhere, not here
            else:
                changed = None  # a new chat
            if changed is None:
                self.save(chat, chat_id, title)
                return chat_id, title, None
            chat_id, title = self.new_id(), f"{title} (copy)"
            self.save(chat, chat_id, title)
        return chat_id, title, f"this chat was {changed} since it was opened here: saved as a new chat, {chat_id}"

    def put(self, path: Path, data: dict, base: float | None = None, keep_title: bool = False) -> dict:
        """Write a checked chat file's ``data`` (the playground's save). With ``base``, the
        ``updated`` of the version the writer read, a file changed or deleted since is not
        overwritten (ChatConflict); with ``keep_title``, an existing file keeps its title (a
        rename made meanwhile stays). Its ``updated`` is stamped here. Returns what was written."""
        with self.locked():
            if base is not None:
                changed = self.changed_since(path, base)
                if changed:
                    raise ChatConflict(changed)
            data = {**data, "updated": time.time()}  # versions in the order they are written
            if keep_title:
                data["title"] = self._title(path) or data["title"]
            problem = save_target_problem(path)
            if problem:
                raise OSError(f"{path} {problem}")
            write_json_atomic(path, data)
        return data

    @staticmethod
    def changed_since(path: Path, updated: float | None) -> str | None:
        """'changed elsewhere' or 'deleted elsewhere' when the file at ``path`` is no longer the
        version whose ``updated`` this is; None when it still is."""
        if not path.exists():
            return "deleted elsewhere"
        try:
            now = check_chat_file(path).get("updated")
        except ChatFileError:
            now = math.nan  # unreadable now: another's to look at, not ours to overwrite
        return None if now == updated else "changed elsewhere"

    @staticmethod
    def _title(path: Path) -> str | None:
        try:
            return check_chat_file(path).get("title")
        except (ChatFileError, OSError):
            return None

    def save_as(self, chat: Chat, path: Path, title: str) -> Path:
        """Save at ``path``; an existing file keeps its permissions. A symbolic link, FIFO or
        device there is never replaced (OSError saying what it is)."""
        problem = save_target_problem(path)
        if problem:
            raise OSError(f"{path} {problem}")
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
        updated = time.time()
        saved = chat.save(path, title=title, updated=updated, format=FORMAT_VERSION)
        if mode is not None:
            os.chmod(saved, mode)
        self._seen[path] = (updated, title)
        self._conversations[path] = _conversation(chat)
        return saved

    def unchanged(self, chat: Chat, chat_id: str, title: str) -> bool:
        """Whether ``chat``, titled ``title``, is what this store last read from or wrote to
        ``chat_id``, whose file is still there: saving it again would change nothing but the
        file's time, which tells a window that has it open that it changed elsewhere."""
        path = self.path(chat_id)
        return (self._seen.get(path, (None, None))[1] == title and path.is_file()
                and self._conversations.get(path) == _conversation(chat))

    def save_elsewhere(self, chat: Chat, chat_id: str, title: str) -> Path | None:
        """When the chats folder cannot take a chat: a copy in the current directory, else the
        temporary one, under a name no file has yet (an earlier copy of the same chat stays);
        its path, or None when neither takes it."""
        for folder in (Path.cwd(), Path(tempfile.gettempdir())):
            for n in range(1, 100):
                path = folder / f"gptoss-mlx-chat-{chat_id}{'' if n == 1 else f'-{n}'}.json"
                if os.path.lexists(path):
                    continue
                try:
                    return self.save_as(chat, path, title or "Chat")
                except OSError:
                    break
        return None

    def load(self, chat: Chat, chat_id: str) -> str:
        """Load into ``chat``; returns the title. A bad file raises ChatFileError and leaves
        ``chat`` as it was."""
        return self.load_path(chat, self.path(chat_id), default_title=chat_id)

    def load_path(self, chat: Chat, path: Path, default_title: str = "") -> str:
        data = chat.load(path)
        title = data.get("title") or default_title or path.stem
        self._seen[path] = (data.get("updated"), title)
        self._conversations[path] = _conversation(chat)
        return title

    def folder_problem(self) -> str | None:
        """Why the chats folder cannot hold chats (a file in its place, no permission), or None
        (one that does not exist yet is made by the first save)."""
        try:
            st = self.root.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"the chats folder {self.root} cannot be read: {e.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"the chats folder {self.root} is not a folder (something else has its name): no chat can be saved"
        if not os.access(self.root, os.R_OK | os.X_OK):
            return f"the chats folder {self.root} cannot be read: permission denied"
        return None

    def list(self) -> list[Entry]:
        """Newest first. Unreadable files are listed (so they can be deleted), not skipped."""
        listed = {}
        for path in self.root.glob("*.json"):
            try:
                st = path.stat()
            except OSError:
                continue  # deleted meanwhile
            # a file read before and not changed since is not read again (a long chat takes seconds)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = self._listed.get(path)
            listed[path] = known if known and known[0] == stamp else (stamp, self._entry(path, st.st_mtime))
        self._listed = listed
        return sorted((replace(entry) for _, entry in listed.values()), key=lambda e: e.updated, reverse=True)

    @staticmethod
    def _entry(path: Path, mtime: float) -> Entry:
        try:
            data = check_chat_file(path)
        except ChatFileError as e:
            problem = str(e).removeprefix(f"{path}: ")
            return Entry(path.stem, f"{path.stem} (unreadable)", mtime, -1, problem)
        return Entry(path.stem, data.get("title") or path.stem, data.get("updated") or mtime,
                     message_count(data["messages"]))

    def latest(self) -> str | None:
        """The id of the most recently updated readable chat."""
        return next((e.id for e in self.list() if e.messages >= 0), None)

    def rename(self, chat_id: str, title: str) -> None:
        """Give a saved chat a new title; its conversation and version stay."""
        path = self.path(chat_id)
        with self.locked():
            data = check_chat_file(path)
            data["title"] = title
            write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))
        if self._seen.get(path, (None,))[0] == data.get("updated"):
            self._seen[path] = (data.get("updated"), title)

    def delete(self, chat_id: str) -> None:
        path = self.path(chat_id)
        with self.locked():
            path.unlink(missing_ok=True)
        self._seen.pop(path, None)

    def export_markdown(self, chat: Chat, title: str, chat_id: str) -> Path:
        return write_text_atomic(self.exports / f"{chat_id}.md", to_markdown(chat, title))


def message_count(messages: list[dict]) -> int:
    """A conversation's length as it is shown everywhere: its user and assistant messages in
    the Chat Completions shape (a message that calls tools included; tool results and
    instructions not)."""
    return sum(1 for m in messages if m["role"] in ("user", "assistant"))


# What a reply's last message says of how it ended (Message.cut), shown where a chat is read
# (the TUI's turns, the Markdown export).
CUT_NOTES = {"length": "cut off: token limit", "context": "cut off: context full", "interrupted": "stopped"}
# below a message that has no reply: the app was left before one began (the model reads the
# message with the next one, as two turns)
UNANSWERED = "not answered: stopped before the reply began"


def to_markdown(chat: Chat, title: str) -> str:
    """The conversation as Markdown: instructions, each turn, reasoning in <details>, and how
    a reply cut short ended."""
    out = [f"# {title}", "", f"*gpt-oss · reasoning effort {chat.reasoning_effort}*", ""]
    if chat.instructions:
        out += ["## Instructions", "", chat.instructions, ""]
    messages = chat.messages
    for i, m in enumerate(messages):
        if m.role == "user":
            out += ["## User", "", m.text, ""]
            if i + 1 == len(messages) or messages[i + 1].role == "user":
                out += [f"*({UNANSWERED})*", ""]
            continue
        elif m.role == "tool":
            out += [f"**Tool result ({m.name})**", "", "```", m.text, "```", ""]
        elif m.is_tool_call:  # (python's is code; a function's and the browser's, JSON)
            fence = "```python" if m.recipient == "python" else "```json"
            out += [f"**Tool call `{m.recipient}`**", "", fence, m.text, "```", ""]
        elif m.channel == "analysis":
            out += ["<details><summary>Reasoning</summary>", "", m.text, "", "</details>", ""]
        else:
            out += ["## Assistant", "", m.text, ""]
        if m.cut in CUT_NOTES:
            out += [f"*({CUT_NOTES[m.cut]})*", ""]
    return "\n".join(out).rstrip() + "\n"


class _ByFile(dict):
    """A dict keyed by the file a path names: a chat /save'd over its own file by another path
    (through a link: on macOS /tmp is /private/tmp) is the same chat's save, not a change made
    elsewhere."""

    @staticmethod
    def _file(path) -> Path:
        return Path(os.path.realpath(path))

    def __getitem__(self, path):
        return super().__getitem__(self._file(path))

    def __setitem__(self, path, value):
        super().__setitem__(self._file(path), value)

    def __contains__(self, path):
        return super().__contains__(self._file(path))

    def get(self, path, default=None):
        return super().get(self._file(path), default)

    def pop(self, path, *default):
        return super().pop(self._file(path), *default)


def _conversation(chat: Chat) -> str:
    """What a chat file holds of ``chat`` (not its title or time), to compare."""
    return json.dumps(chat.to_json(), sort_keys=True)

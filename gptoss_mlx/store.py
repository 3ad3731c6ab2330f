"""Saved conversations, shared by ``gptoss-mlx chat`` and the TUI: one JSON file per chat in
the platform's data directory, written atomically after every completed reply.

Each file is what ``Chat.save`` writes (gptoss_mlx/chat_file.py), checked field by field before
it replaces the conversation, so a damaged or hostile file is refused with its name and field and
the conversation on screen stays.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .chat import Chat
from .chat_file import FORMAT_VERSION, ChatFileError, check_chat_file, write_text_atomic
from .files import regular_file_problem

ORPHAN_AGE_S = 60.0  # a temporary file this old belongs to a save that was killed


def data_dir() -> Path:
    """$GPTOSS_MLX_DATA_DIR, else ~/Library/Application Support/gptoss-mlx on macOS and
    $XDG_DATA_HOME/gptoss-mlx (~/.local/share/gptoss-mlx) elsewhere."""
    if os.environ.get("GPTOSS_MLX_DATA_DIR"):
        return Path(os.environ["GPTOSS_MLX_DATA_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "gptoss-mlx"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "gptoss-mlx"


def save_target_problem(path: Path) -> str | None:
    """Why a chat must not be saved over ``path`` (it is a symbolic link, directory, FIFO or
    device); None for a new path or a regular file."""
    if path.is_symlink():
        return "is a symbolic link; save to the file it points to"
    return regular_file_problem(path) if path.exists() else None


# ----------------------------------------------------------------------------- the store
@dataclass
class Entry:
    id: str
    title: str
    updated: float
    messages: int  # user and assistant messages; -1 when the file cannot be read
    problem: str = ""  # why it cannot be read


def title_for(text: str) -> str:
    line = " ".join(text.split())
    return line[:60] + ("…" if len(line) > 60 else "") or "New chat"


MAX_ID_BYTES = 200  # a chat's id (its file name less '.json') in UTF-8


class ConversationStore:
    """``root`` is the data directory; chats live in ``root/chats``, Markdown exports in
    ``root/exports``, the terminal chat's input history in ``root/input-history``."""

    def __init__(self, root: Path | None = None):
        self.root = (root or data_dir()) / "chats"
        self.exports = self.root.parent / "exports"
        self.history_file = self.root.parent / "input-history"
        self._seen: dict[Path, float | None] = {}  # file -> its "updated" as this store last read or wrote it
        self.remove_orphans()

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
        """Save over ``chat_id`` unless its file was changed or deleted elsewhere (the playground,
        another window) since this store last read or wrote it: then the conversation is saved as
        a new chat, "TITLE (copy)", and nobody's turns are lost. Returns the chat's id and title
        now, and a note saying what happened (None when saved in place)."""
        path = self.path(chat_id)
        changed = self.changed_since(path, self._seen[path]) if path in self._seen else None
        if changed is None:
            self.save(chat, chat_id, title)
            return chat_id, title, None
        chat_id, title = self.new_id(), f"{title} (copy)"
        self.save(chat, chat_id, title)
        return chat_id, title, f"this chat was {changed} since it was opened here: saved as a new chat, {chat_id}"

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
        self._seen[path] = updated
        return saved

    def load(self, chat: Chat, chat_id: str) -> str:
        """Load into ``chat``; returns the title. A bad file raises ChatFileError and leaves
        ``chat`` as it was."""
        return self.load_path(chat, self.path(chat_id), default_title=chat_id)

    def load_path(self, chat: Chat, path: Path, default_title: str = "") -> str:
        data = chat.load(path)
        self._seen[path] = data.get("updated")
        return data.get("title") or default_title or path.stem

    def list(self) -> list[Entry]:
        """Newest first. Unreadable files are listed (so they can be deleted), not skipped."""
        entries = []
        for path in self.root.glob("*.json"):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # deleted meanwhile
            try:
                data = check_chat_file(path)
            except ChatFileError as e:
                problem = str(e).removeprefix(f"{path}: ")
                entries.append(Entry(path.stem, f"{path.stem} (unreadable)", mtime, -1, problem))
                continue
            n = message_count(data["messages"])
            entries.append(Entry(path.stem, data.get("title") or path.stem,
                                 data.get("updated") or mtime, n))
        return sorted(entries, key=lambda e: e.updated, reverse=True)

    def latest(self) -> str | None:
        """The id of the most recently updated readable chat."""
        return next((e.id for e in self.list() if e.messages >= 0), None)

    def rename(self, chat_id: str, title: str) -> None:
        path = self.path(chat_id)
        data = check_chat_file(path)
        data["title"] = title
        write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))

    def delete(self, chat_id: str) -> None:
        path = self.path(chat_id)
        path.unlink(missing_ok=True)
        self._seen.pop(path, None)

    def export_markdown(self, chat: Chat, title: str, chat_id: str) -> Path:
        return write_text_atomic(self.exports / f"{chat_id}.md", to_markdown(chat, title))


def message_count(messages: list[dict]) -> int:
    """A conversation's length as it is shown everywhere: its user and assistant messages in
    the Chat Completions shape (a message that calls tools included; tool results and
    instructions not)."""
    return sum(1 for m in messages if m["role"] in ("user", "assistant"))


def to_markdown(chat: Chat, title: str) -> str:
    """The conversation as Markdown: instructions, each turn, reasoning in <details>."""
    out = [f"# {title}", "", f"*gpt-oss · reasoning effort {chat.reasoning_effort}*", ""]
    if chat.instructions:
        out += ["## Instructions", "", chat.instructions, ""]
    for m in chat.messages:
        if m.role == "user":
            out += ["## User", "", m.text, ""]
        elif m.role == "tool":
            out += [f"**Tool result ({m.name})**", "", "```", m.text, "```", ""]
        elif m.is_tool_call:
            out += [f"**Tool call `{m.recipient}`**", "", "```json", m.text, "```", ""]
        elif m.channel == "analysis":
            out += ["<details><summary>Reasoning</summary>", "", m.text, "", "</details>", ""]
        else:
            out += ["## Assistant", "", m.text, ""]
    return "\n".join(out).rstrip() + "\n"

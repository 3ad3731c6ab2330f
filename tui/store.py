"""Saved conversations: one JSON file per chat in the platform's data directory.

Each file is what ``Chat.save`` writes (Chat Completions JSON, reasoning and tool calls
included) plus a ``title``. Files are written atomically after every completed reply.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from gptoss_mlx.chat import Chat, write_json_atomic


def data_dir() -> Path:
    """$GPTOSS_MLX_DATA_DIR, else ~/Library/Application Support/gptoss-mlx on macOS and
    $XDG_DATA_HOME/gptoss-mlx (~/.local/share/gptoss-mlx) elsewhere."""
    if os.environ.get("GPTOSS_MLX_DATA_DIR"):
        return Path(os.environ["GPTOSS_MLX_DATA_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "gptoss-mlx"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "gptoss-mlx"


@dataclass
class Entry:
    id: str
    title: str
    updated: float
    messages: int  # user and assistant messages; -1 when the file cannot be read


def title_for(text: str) -> str:
    line = " ".join(text.split())
    return line[:60] + ("…" if len(line) > 60 else "") or "New chat"


class ConversationStore:
    def __init__(self, root: Path | None = None):
        self.root = (root or data_dir()) / "chats"

    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]

    def path(self, chat_id: str) -> Path:
        if not re.fullmatch(r"[\w.-]+", chat_id):
            raise ValueError(f"not a conversation id: {chat_id!r}")
        return self.root / f"{chat_id}.json"

    def save(self, chat: Chat, chat_id: str, title: str) -> Path:
        return chat.save(self.path(chat_id), title=title, updated=time.time())

    def load(self, chat: Chat, chat_id: str) -> str:
        """Load into ``chat``; returns the title. Raises ChatFileError for a bad file."""
        path = self.path(chat_id)
        chat.load(path)
        try:
            return json.loads(path.read_text()).get("title") or chat_id
        except (OSError, ValueError, AttributeError):
            return chat_id

    def list(self) -> list[Entry]:
        """Newest first. Unreadable files are listed (so they can be deleted), not skipped."""
        entries = []
        for path in self.root.glob("*.json"):
            try:
                data = json.loads(path.read_text())
                n = sum(1 for m in data.get("messages", []) if m.get("role") in ("user", "assistant"))
                entries.append(Entry(path.stem, data.get("title") or path.stem,
                                     data.get("updated") or path.stat().st_mtime, n))
            except (OSError, ValueError, AttributeError):
                entries.append(Entry(path.stem, f"{path.stem} (unreadable)", path.stat().st_mtime, -1))
        return sorted(entries, key=lambda e: e.updated, reverse=True)

    def rename(self, chat_id: str, title: str) -> None:
        path = self.path(chat_id)
        data = json.loads(path.read_text())
        data["title"] = title
        write_json_atomic(path, data)

    def delete(self, chat_id: str) -> None:
        self.path(chat_id).unlink(missing_ok=True)

    def export_markdown(self, chat: Chat, title: str, chat_id: str) -> Path:
        path = self.root.parent / "exports" / f"{chat_id}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_markdown(chat, title))
        return path


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

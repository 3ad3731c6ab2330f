"""The Textual chat app (installed as gptoss_mlx.tui): ``gptoss-mlx tui``."""

from .app import ChatApp
from gptoss_mlx.store import ConversationStore, data_dir, to_markdown

__all__ = ["ChatApp", "ConversationStore", "data_dir", "to_markdown"]

"""gpt-oss-20b and gpt-oss-120b on Apple Silicon with MLX.

    from gptoss_mlx import load
    model, tokenizer = load("openai/gpt-oss-20b")
    logits = model(mx.array([tokens]), cache=model.make_cache())
"""

from .config import ConfigError, ModelConfig
from .loading import CheckpointError, load
from .model import Model
from .tokenizer import HarmonyEncoding, TokenizerError, load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "HarmonyEncoding", "Model", "ModelConfig", "TokenizerError",
    "load", "load_tokenizer", "__version__",
]

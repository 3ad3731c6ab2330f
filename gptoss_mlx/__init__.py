"""gpt-oss-20b and gpt-oss-120b on Apple Silicon with MLX.

    from gptoss_mlx import load
    model, tokenizer = load("openai/gpt-oss-20b")
    logits = model(mx.array([tokens]), cache=model.make_cache())
"""

import importlib

__version__ = "0.1.0"
# Each name and the module that defines it, imported when the name is first used (PEP 562):
# importing the package alone loads no MLX, so the command's entry point (launch.py) can end
# quietly on a Ctrl-C while the rest loads (it printed a traceback of the imports).
_EXPORTS = {"CheckpointError": "loading", "load": "loading", "ConfigError": "config", "ModelConfig": "config",
            "Model": "model", "HarmonyEncoding": "tokenizer", "TokenizerError": "tokenizer",
            "load_tokenizer": "tokenizer"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

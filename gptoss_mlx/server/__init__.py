"""``gptoss-mlx serve``: an OpenAI-compatible HTTP server (Chat Completions and Responses).

    service = Service(model_name, tokenizer, engine, Scheduler(engine, max_concurrency=4, cache_bytes=4 << 30))
    app = create_app(service, api_key=None)   # a Starlette app; run it with uvicorn
    serve(service, "127.0.0.1", 8000)          # or serve it until SIGTERM / Ctrl-C
"""

from .app import create_app, serve
from .errors import APIError
from .scheduler import PromptCachePool, Scheduler
from .service import Service

__all__ = ["APIError", "PromptCachePool", "Scheduler", "Service", "create_app", "serve"]

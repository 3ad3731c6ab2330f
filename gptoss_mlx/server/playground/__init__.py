"""The browser playground that ``gptoss-mlx serve`` serves at ``/``: one page (``static/``, no
build step, nothing fetched from elsewhere) talking to this server's Responses API, and small
JSON endpoints over the saved conversations (gptoss_mlx/store.py, the TUI's and ``chat
--resume``'s store and format):

    GET    /v1/playground/info          the model, the efforts and its default, the tools the server runs
    GET    /v1/playground/chats         saved chats, newest first
    POST   /v1/playground/chats         save a new chat              -> {"id": ...}
    GET    /v1/playground/chats/{id}    one chat, as the store keeps it
    PUT    /v1/playground/chats/{id}    replace it
    PATCH  /v1/playground/chats/{id}    {"title": ...}
    DELETE /v1/playground/chats/{id}

The store's files are read and written off the event loop, so a long list never holds up a
reply that is streaming. They follow the server's API key. Without one, they answer only a loopback Host (a web page
that rebinds its own name to 127.0.0.1 cannot read your chats) and only requests from this
server's own origin (another site cannot change them). Errors have OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time
import unicodedata
from importlib import resources
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...chat_file import FORMAT_VERSION, ChatFileError, chat_file_problem, check_chat_file
from ...harmony import EFFORTS
from ...store import ChatConflict, ConversationStore, save_target_problem, title_for
from ..errors import APIError, bad_request, host_name, refuse_other_origins
from ..service import Service

ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css",
          "icon.svg": "image/svg+xml"}
# The page runs only its own files: no inline script or style, nothing from another origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
SAVED_KEYS = ("title", "messages", "reasoning_effort", "tools", "response_format", "date")  # what the page may save
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_TITLE_CHARS = 200


def checked_title(title: str) -> str:
    """``title`` as saved (its blank space around it gone), or a 400: empty, longer than
    MAX_TITLE_CHARS, or holding a line break or another control character (a list shows titles
    on one line: they took newlines and NULs)."""
    title = title.strip()
    if not title:
        raise bad_request("'title' must not be empty", "title")
    if len(title) > MAX_TITLE_CHARS:
        raise bad_request(f"'title' is {len(title)} characters: at most {MAX_TITLE_CHARS}", "title")
    control = next((c for c in title if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if control is not None:
        raise bad_request(f"'title' must be one line without control characters, got {control!r} in it", "title")
    return title


def _static(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


def routes(service: Service, chats: ConversationStore, api_key: str | None,
           authorize: Callable[[Request], None], json_body: Callable[[Request], Awaitable[dict]]) -> list[Route]:
    """The page, its assets and the chat endpoints. ``authorize`` and ``json_body`` are the
    server's (the API key, the capped body reader)."""

    def guard(request: Request) -> None:
        authorize(request)
        host = host_name(request) or ""
        if api_key is None and host not in LOOPBACK_HOSTS:
            raise APIError(403, f"saved chats are served to {host or 'an unnamed host'} only when the server "
                           "has an API key (gptoss-mlx serve --api-key)", code="forbidden")
        refuse_other_origins(request, "this server's saved chats")

    def chat_path(request: Request, must_exist: bool = True):
        chat_id = request.path_params["chat_id"]
        try:
            path = chats.path(chat_id)
        except ChatFileError as e:
            raise bad_request(str(e), "chat_id", "invalid_chat_id") from None
        if must_exist and not path.exists():
            raise APIError(404, f"no saved chat {chat_id!r}", param="chat_id", code="chat_not_found")
        return chat_id, path

    async def saved_body(body: dict) -> dict:
        """The chat to save (a request's body), checked as the store checks a file; without a
        title, its first user message names it (as in the TUI)."""
        data = {k: body[k] for k in SAVED_KEYS if k in body}
        problem = await asyncio.to_thread(chat_file_problem, data)  # renders the conversation
        if problem:
            raise bad_request(f"not a chat that can be saved: {problem}")  # it names the field
        if data.get("title") is None:
            first = next((m for m in data["messages"] if m["role"] == "user"), {})
            data["title"] = title_for(first.get("content") if isinstance(first.get("content"), str) else "")
        data["title"] = checked_title(data["title"])
        return {**data, "updated": time.time(), "format": FORMAT_VERSION}

    async def write(path, data: dict, base: float | None = None, keep_title: bool = False) -> dict:
        """The store's put, off the event loop: a link, folder or device at ``path`` is a 409
        (cannot_save), as is a chat changed or deleted since ``base`` (chat_changed, chat_deleted)."""
        problem = save_target_problem(path)
        if problem:
            raise APIError(409, f"{path} {problem}", code="cannot_save")
        try:
            return await asyncio.to_thread(chats.put, path, data, base, keep_title)
        except ChatConflict as e:
            chat_id = path.stem
            if str(e) == "deleted elsewhere":
                raise APIError(409, f"the chat {chat_id!r} was deleted elsewhere since this page opened it",
                               param="base", code="chat_deleted") from None
            raise APIError(409, f"the chat {chat_id!r} was changed elsewhere (another tab, the TUI or the "
                           "terminal chat) since this page opened it", param="base", code="chat_changed") from None
        except OSError as e:  # larger than a saved chat may be (EFBIG), a full or read-only disk: the file is kept
            status, code = (413, "chat_too_large") if e.errno == errno.EFBIG else (409, "cannot_save")
            raise APIError(status, f"the chat was not saved: {e.strerror or e}", code=code) from None

    async def info(request: Request):
        authorize(request)  # nothing private: the page needs it wherever it is opened
        tools = service.tools
        return JSONResponse({
            "model": service.model_name, "efforts": list(EFFORTS), "reasoning_effort": service.reasoning_effort,
            "max_context": service.max_context,
            "python": bool(tools and tools.python is not None), "browser": bool(tools and tools.browser),
            "functions": [f.name for f in tools.functions] if tools else []})

    async def list_chats(request: Request):
        guard(request)
        entries = await asyncio.to_thread(chats.list)
        return JSONResponse({"object": "list", "data": [dataclasses.asdict(e) for e in entries]})

    async def create_chat(request: Request):
        guard(request)
        data = await saved_body(await json_body(request))
        chat_id = chats.new_id()
        data = await write(chats.path(chat_id), data)
        return JSONResponse({"id": chat_id, "title": data["title"], "updated": data["updated"]}, status_code=201)

    async def get_chat(request: Request):
        guard(request)
        chat_id, path = chat_path(request)
        try:
            data = await asyncio.to_thread(check_chat_file, path)
        except ChatFileError as e:
            raise APIError(422, str(e), param="chat_id", code="unreadable_chat") from None
        return JSONResponse({"id": chat_id, **data})

    async def put_chat(request: Request):
        """Save over a chat. With ``base`` (the ``updated`` of the version the page last read or
        wrote), a chat changed or deleted since (another tab, the TUI, the terminal chat) is a
        409 rather than overwritten: the page then saves its conversation as a new chat. Without
        ``title``, the saved chat keeps its own (renames are PATCH's)."""
        guard(request)
        chat_id, path = chat_path(request, must_exist=False)
        body = await json_body(request)
        base = body.get("base")
        if base is not None and (not isinstance(base, (int, float)) or isinstance(base, bool)):
            raise bad_request("'base' must be the 'updated' time of the version this saves over", "base")
        data = await write(path, await saved_body(body), base, keep_title="title" not in body)
        return JSONResponse({"id": chat_id, "title": data["title"], "updated": data["updated"]})

    async def patch_chat(request: Request):
        guard(request)
        chat_id, _ = chat_path(request)
        title = (await json_body(request)).get("title")
        if not isinstance(title, str):
            raise bad_request("'title' must be a non-empty string", "title")
        title = checked_title(title)
        try:
            await asyncio.to_thread(chats.rename, chat_id, title)
        except ChatFileError as e:
            raise APIError(422, str(e), param="chat_id", code="unreadable_chat") from None
        return JSONResponse({"id": chat_id, "title": title})

    async def delete_chat(request: Request):
        guard(request)
        chat_id, _ = chat_path(request)
        await asyncio.to_thread(chats.delete, chat_id)
        return JSONResponse({"id": chat_id, "deleted": True})

    async def page(request: Request):
        return Response(_static("index.html"), media_type="text/html", headers=PAGE_HEADERS)

    async def asset(request: Request):
        name = request.path_params["name"]
        if name not in ASSETS:
            raise APIError(404, f"no playground file {name!r}", code="not_found")
        return Response(_static(name), media_type=ASSETS[name], headers=PAGE_HEADERS)

    return [Route("/", page), Route("/playground/{name}", asset),
            Route("/v1/playground/info", info),
            Route("/v1/playground/chats", list_chats, methods=["GET"]),
            Route("/v1/playground/chats", create_chat, methods=["POST"]),
            Route("/v1/playground/chats/{chat_id}", get_chat, methods=["GET"]),
            Route("/v1/playground/chats/{chat_id}", put_chat, methods=["PUT"]),
            Route("/v1/playground/chats/{chat_id}", patch_chat, methods=["PATCH"]),
            Route("/v1/playground/chats/{chat_id}", delete_chat, methods=["DELETE"])]

"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a status."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..files import CheckpointError
from ..generate import NonFiniteLogitsError

log = logging.getLogger("gptoss_mlx.server")


class APIError(Exception):
    """A request that cannot be served; becomes an error response (or a failed stream event)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def generation_failed(error: Exception, what: str) -> APIError:
    """A request that failed after it was accepted, as a 500 in OpenAI's shape with the failure's
    own message (the same for a streamed request's last event and a plain response). A model
    that cannot go on — its checkpoint damaged or changed on disk while experts stream from it,
    NaN logits — is logged in one line; anything else is a bug, logged with its traceback."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, (CheckpointError, NonFiniteLogitsError)):
        log.error("%s failed: %s", what, error)
    else:
        log.error("%s failed", what, exc_info=error)
    return APIError(500, str(error) or type(error).__name__, type="server_error", code="server_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _netloc(url: str) -> str | None:
    try:
        return urlsplit(url).netloc
    except ValueError:  # "http://[x" is no origin
        return None


def refuse_other_origins(request: Request, what: str) -> None:
    """403 for a browser request sent by a page of another site (its ``Origin`` is not this
    server). Without this, any web page open on the user's machine could make the local server
    generate (a plain-text POST needs no CORS preflight) or change the saved chats. Clients
    other than browsers send no Origin and are not affected."""
    origin = request.headers.get("origin")
    if origin is not None and _netloc(origin) != request.headers.get("host"):
        raise APIError(403, f"requests from {origin} may not use {what}", code="forbidden")


def host_name(request: Request) -> str | None:
    """The host the request was addressed to (its Host header less the port), lowercase; None
    when the header is not a host (``[evil.com]``)."""
    try:
        return urlsplit(f"//{request.headers.get('host', '')}").hostname
    except ValueError:
        return None


def refuse_named_hosts(request: Request, api_key: str | None) -> None:
    """Without an API key, 403 for a request addressed to a host name other than localhost. A
    web page can point its own name at 127.0.0.1 (DNS rebinding): its requests then carry that
    name in Host, and an Origin that matches it. Addresses (127.0.0.1, a LAN address with
    --allow-remote-without-key) and localhost are what people type; a name needs the key."""
    if api_key is not None or not request.headers.get("host"):
        return
    host = host_name(request)
    if host == "localhost":
        return
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        raise APIError(403, f"requests addressed to {host!r} need an API key: address this server as "
                       "127.0.0.1 or localhost, or start it with --api-key (without one, a web page "
                       "that points its own name at this machine could use it)", code="forbidden") from None

"""``gptoss-mlx serve``: the OpenAI-compatible server (gptoss_mlx/server/) on uvicorn."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from ..memory import PROMPT_CACHE_GB
from . import common
from .common import CLIError, add_model_options, make_toolbox

LOOPBACK_NAMES = ("localhost",)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve /v1/responses, /v1/chat/completions, /v1/models and a browser playground at /. "
                                   "Sampling and effort flags are defaults that requests override; "
                                   "--system is used by requests that bring no instructions. "
                                   "--tools and --functions run on the server, for every client "
                                   "(the flag is the approval; python is stateless per call).")
    add_model_options(p, interactive=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000,
                   help="port to listen on (default 8000; 0: any free one, which is printed)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--allow-remote-without-key", action="store_true",
                   help="bind a non-loopback --host without --api-key (anyone who can reach it can use it)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="requests in flight (queued or generating); one more waits a moment for a "
                        "slot to be freed, then gets 429 (default 4)")
    p.add_argument("--prompt-cache-gb", type=common.cache_gb, default=None,
                   help=f"memory for the prompt caches of recent conversations (default {PROMPT_CACHE_GB:g}, or "
                        "one conversation's where that would leave the experts streamed); the memory plan "
                        "counts it and --max-concurrency conversations' KV caches")
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return port


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use, or a host that is not
    an address of this machine, is one error at once, not a failure after a long load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise CLIError(f"--host {host}: not an address or name of this machine "
                       f"({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = (": another program (or another gptoss-mlx serve) listens there; choose another --port"
                if e.errno == errno.EADDRINUSE else "")
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def check_binding(args) -> None:
    if is_loopback(args.host) or args.api_key:
        return
    if not args.allow_remote_without_key:
        raise CLIError(f"--host {args.host} is reachable from other machines: set --api-key KEY, or "
                       "pass --allow-remote-without-key to serve it without one")
    print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can "
          "use the model", file=sys.stderr)


def cmd_serve(args) -> int:
    from ..server import Scheduler, Service, serve
    from ..server.tools import ServerTools

    if common.follow_rank0(args):  # another machine's share of the model; rank 0 does the I/O
        return 0
    check_binding(args)
    if args.max_concurrency < 1:
        raise CLIError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    sock = listening_socket(args.host, args.port)
    toolbox = make_toolbox(args, prints_to_stderr=False)  # checks the flags, the files and the sandbox
    tools = ServerTools.from_toolbox(toolbox, args.function_timeout) if toolbox else None
    if toolbox:
        toolbox.close()
    chat = common.load_chat(args)
    engine = chat.engine
    base = args.model or common.DEFAULT_MODEL
    # under an adapter the model is another: "BASE+ADAPTER" (the base's name is accepted too)
    name = f"{base}+{Path(args.adapter).resolve().name}" if args.adapter else base
    service = Service(name, chat.tokenizer, engine,
                      Scheduler(engine, args.max_concurrency, args.prompt_cache_bytes),
                      sampling=chat.sampling, reasoning_effort=chat.reasoning_effort,
                      reasoning_budget=chat.reasoning_budget,
                      instructions=chat.instructions, tools=tools, base_model=base if args.adapter else None)
    log = logging.getLogger("gptoss_mlx.server")  # one line per request; uvicorn's own: warnings
    log.addHandler(request_log_handler())
    log.setLevel(logging.INFO)
    where = f"[{args.host}]" if ":" in args.host else args.host
    where = f"{where}:{sock.getsockname()[1]}"
    print(f"Serving {service.model_name} on http://{where}/v1 (playground: http://{where}/)", file=sys.stderr)
    serve(service, args.host, args.port, api_key=args.api_key, sock=sock)
    return 0


class _TerminalSafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return common.terminal_safe(super().format(record))


def request_log_handler() -> logging.Handler:
    """The server's log on standard error. Its lines quote what clients sent (a model's name, a
    parameter), so escape sequences in them are shown as markers, not run by the terminal."""
    handler = logging.StreamHandler()
    handler.setFormatter(_TerminalSafeFormatter("%(asctime)s %(message)s"))
    return handler

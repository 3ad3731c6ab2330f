"""The built-in ``browser`` tool: ``search``, ``open`` and ``find`` over a stack of pages.

As in OpenAI's reference (gpt-oss.md section 5): every page the model sees gets a cursor
(its index in the stack); a page is shown as numbered lines,

    [3] Example Domain (example.com)
    **viewing lines [0 - 11] of 11**

    L0: Example Domain
    L1: This domain is for use in 【0†illustrative examples】 ...

links are numbered ``【n†text】`` so ``open(id=n)`` follows them, and the model cites lines
as ``【cursor†Lstart-Lend】``. ``open`` fetches pages over HTTP(S); ``search`` uses a
backend the user configures — ``EXA_API_KEY`` selects Exa, or pass any object with
``search(query, topn) -> list[SearchResult]``.

Fetching is defensive (issue 17): only http(s); every address is checked after DNS resolution
and again on each redirect, and the connection goes to the address that was checked (no
DNS-rebinding gap); loopback, private, link-local (169.254.169.254), CGNAT, multicast and
reserved ranges are refused unless ``allow_private``; an API key never follows a redirect to
another origin; a page has one time limit in all (a server dripping a byte a second cannot
hold it) and a size cap that also bounds what a gzip body inflates to.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import socket
import textwrap
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Callable, Protocol

from .functions import ToolError, validate

LINE_WIDTH = 100
VIEW_LINES = 60  # lines shown per view (the reference shows about 1024 tokens)
MAX_VIEW_LINES = 400  # however many the model asks for
MAX_BYTES = 2_000_000  # of a page, after decompression
PAGE_TIMEOUT = 20.0  # seconds for a whole page: connecting, redirects, headers and body
PARSE_S = 5.0  # seconds to turn a page's HTML into text; what is left after is not shown
MAX_REDIRECTS = 5
MAX_TITLE = 200
READ_CHUNK = 1 << 16
USER_AGENT = "gptoss-mlx browser"
SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-api-key"}
REDIRECTS = {301, 302, 303, 307, 308}


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str = ""


class SearchBackend(Protocol):
    def search(self, query: str, topn: int) -> list[SearchResult]: ...


# --------------------------------------------------------------------------- fetching
def is_public_address(ip: str) -> bool:
    """Whether ``ip`` is on the public internet: not loopback, private, link-local, CGNAT,
    multicast, reserved or unspecified, nor an IPv6 form of such an IPv4 address
    (IPv4-mapped, 6to4; NAT64's 64:ff9b::/96 lies in the reserved ::/8)."""
    address = ipaddress.ip_address(ip.split("%")[0])  # an IPv6 zone (fe80::1%eth0) aside
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    if any(address in network for network in _SPECIAL_USE):
        return False
    return address.is_global and not (address.is_multicast or address.is_reserved
                                      or address.is_unspecified or address.is_link_local)


# Special-purpose ranges that Python's is_global calls global in some versions (3.11 and older:
# IETF protocol assignments, the 6to4 relay anycast, IPv6 site-local, the documentation blocks)
_SPECIAL_USE = [ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24", "fec0::/10", "3fff::/20",
                                                   "2001:db8::/32")]


def system_resolve(host: str, port: int) -> list[str]:
    """The addresses DNS gives for ``host``, in the system's order of preference."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def system_connect(ip: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((ip, port), timeout)


@dataclass
class Response:
    url: str
    status: int
    headers: http.client.HTTPMessage
    body: bytes = b""
    truncated: bool = False  # the body went on past max_bytes


@dataclass
class WebClient:
    """HTTP(S) requests under the browser's rules (see the module docstring).

    ``resolve(host, port) -> [ip]`` and ``connect(ip, port, timeout) -> socket`` are the
    network; tests pass their own so that nothing leaves 127.0.0.1."""

    allow_private: bool = False
    timeout: float = PAGE_TIMEOUT
    max_bytes: int = MAX_BYTES
    resolve: Callable[[str, int], list[str]] = system_resolve
    connect: Callable[[str, int, float], socket.socket] = system_connect

    def request(self, url: str, method: str = "GET", headers: dict | None = None,
                body: bytes | None = None) -> Response:
        """Follow up to MAX_REDIRECTS redirects; ToolError for anything but a 2xx answer."""
        deadline = time.monotonic() + self.timeout
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip, deflate", **(headers or {})}
        first = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self._send(url, method, headers, body, deadline)
            except ToolError as e:  # a hop's refusal names the page that led there (helper-157)
                if url == first:
                    raise
                raise ToolError(f"{first} redirected to {e}") from None
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or not location:
                if response.status >= 300:
                    reason = http.client.responses.get(response.status, "")
                    raise ToolError(f"{url}: HTTP {response.status} {reason}".rstrip())
                return response
            target = urllib.parse.urljoin(url, location.strip())
            if _origin(target) != _origin(url):  # the key stays with the origin it was for
                headers = {k: v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            url = target
        raise ToolError(f"{url}: too many redirects (more than {MAX_REDIRECTS})")

    def _address(self, url: str, host: str, port: int) -> str:
        """The first address of ``host`` that may be contacted (checked after resolution)."""
        try:
            addresses = self.resolve(host, port)
        except (OSError, UnicodeError) as e:
            raise ToolError(f"{url}: cannot resolve {host} ({e})") from None
        allowed = [ip for ip in addresses if self.allow_private or is_public_address(ip)]
        if not allowed:
            found = ", ".join(addresses) or "none"
            raise ToolError(f"{url}: {host} is a private or local address ({found}); the browser "
                            "only opens public addresses (--browser-allow-private)")
        return allowed[0]

    def _send(self, url: str, method: str, headers: dict, body: bytes | None, deadline: float) -> Response:
        """One request to the checked address; the socket is shut at the deadline, whatever
        it is waiting for."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ToolError(f"only http(s) URLs can be opened, not {url[:200]!r}")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except (UnicodeError, ValueError) as e:
            raise ToolError(f"{url[:200]}: not a valid URL ({e})") from None
        if not host:
            raise ToolError(f"{url[:200]}: not a valid URL (no host)")
        ip = self._address(url, host, port)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ToolError(f"{url}: gave up after {self.timeout:g} s (the server is too slow)")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(host, port, timeout=remaining)  # the name: Host header, SNI, certificate
        raw: list[socket.socket] = []
        expired = threading.Event()

        def connect(address, timeout, source_address=None):
            raw.append(self.connect(ip, port, timeout))  # the checked address, not a new lookup
            return raw[-1]

        def expire():
            expired.set()
            for sock in [conn.sock, *raw]:
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once
                except OSError:
                    pass

        conn._create_connection = connect
        watchdog = threading.Timer(remaining, expire)
        watchdog.daemon = True
        watchdog.start()
        target = urllib.parse.quote(parts.path or "/", safe="/:@!$&'()*+,;=%~-._")
        target += "?" + urllib.parse.quote(parts.query, safe="/:@!$&'()*+,;=%~-._?") if parts.query else ""
        try:
            conn.request(method, target, body=body, headers=headers)
            response = conn.getresponse()
            result = Response(url, response.status, response.headers)
            if response.status not in REDIRECTS:
                result.body, result.truncated = self._read_body(url, response)
        except (OSError, http.client.HTTPException, ValueError) as e:
            if isinstance(e, TimeoutError):  # the socket's own timeout: the watchdog's deadline too
                expired.set()
            if not expired.is_set():
                raise ToolError(f"{url}: could not be fetched ({type(e).__name__}: {e})") from None
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():  # what was read before the socket was shut is incomplete
            raise ToolError(f"{url}: gave up after {self.timeout:g} s (the server is too slow)")
        return result

    def _read_body(self, url: str, response: http.client.HTTPResponse) -> tuple[bytes, bool]:
        """At most max_bytes of the body, inflated (gzip, deflate) without ever holding more."""
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise ToolError(f"{url}: unsupported content encoding {encoding!r}")
        inflater = zlib.decompressobj(32 + zlib.MAX_WBITS) if encoding in ("gzip", "x-gzip") else None
        out, size = [], 0
        while size <= self.max_bytes:
            # plain: never read past the cap; compressed: the inflater is what is capped
            compressed = encoding != "identity"
            chunk = response.read(READ_CHUNK if compressed else min(READ_CHUNK, self.max_bytes + 1 - size))
            if not chunk:
                break
            if inflater is None and compressed:  # deflate: zlib's wrapping, or (as browsers take) raw
                while len(chunk) < 2 and (more := response.read(READ_CHUNK)):
                    chunk += more
                zlib_header = len(chunk) >= 2 and chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
                inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
            while chunk and size <= self.max_bytes:
                if inflater is not None:
                    try:
                        piece = inflater.decompress(chunk, self.max_bytes + 1 - size)
                    except zlib.error as e:
                        raise ToolError(f"{url}: the {encoding} body is corrupt ({e})") from None
                    chunk = inflater.unconsumed_tail
                else:
                    piece, chunk = chunk, b""
                out.append(piece)
                size += len(piece)
        body = b"".join(out)
        return body[: self.max_bytes], size > self.max_bytes


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


class ExaBackend:
    """Exa's search API (https://exa.ai); the key comes from ``EXA_API_KEY``."""

    URL = "https://api.exa.ai/search"

    def __init__(self, api_key: str, client: WebClient | None = None, url: str = URL):
        self.api_key, self.url = api_key, url
        self.client = client or WebClient()

    def search(self, query: str, topn: int) -> list[SearchResult]:
        body = json.dumps({"query": query, "numResults": topn,
                           "contents": {"text": {"maxCharacters": 600}}}).encode()
        response = self.client.request(self.url, "POST", {"x-api-key": self.api_key,
                                                          "content-type": "application/json"}, body)
        try:
            data = json.loads(response.body)
        except (ValueError, RecursionError):
            raise ToolError("the search service did not answer with JSON") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise ToolError("the search service's answer holds no list of results")
        return [SearchResult(str(r.get("title") or r.get("url") or ""), str(r.get("url") or ""),
                             str(r.get("text") or "")) for r in results if isinstance(r, dict)]


def default_backend(client: WebClient | None = None) -> SearchBackend | None:
    key = os.environ.get("EXA_API_KEY")
    return ExaBackend(key, client) if key else None


@dataclass
class Page:
    url: str
    title: str
    lines: list[str]
    links: dict[int, str] = field(default_factory=dict)  # link number -> URL
    matches: dict[int, tuple["Page", int]] = field(default_factory=dict)  # a find result's: link -> (page, line)


class _OutOfTime(Exception):
    """The page's HTML took longer than PARSE_S to parse."""


class _TextExtractor(HTMLParser):
    """HTML -> text lines with numbered links; script/style skipped. Every piece the parser
    hands over checks the clock: Python's parser is quadratic on some inputs (thousands of
    unclosed ``<!--``), so a hostile page could otherwise hold the tool for an hour."""

    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "header", "footer", "pre", "blockquote", "hr", "dt", "dd"}

    def __init__(self, base_url: str, deadline: float = math.inf):
        super().__init__(convert_charrefs=True)
        self.base_url, self.deadline = base_url, deadline
        self.domain = urllib.parse.urlsplit(base_url).netloc  # a link elsewhere names its own
        self.parts: list[str] = []
        self.title = ""
        self.links: dict[int, str] = {}
        self._ids: dict[str, int] = {}  # each link's id, by its URL
        self._skip = 0
        self._in_title = False
        self._href: str | None = None
        self._link_text: list[str] = []

    def _in_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OutOfTime

    def handle_starttag(self, tag, attrs):
        self._in_time()
        if tag in ("script", "style", "noscript", "svg"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "a":
            href = dict(attrs).get("href")
            if href and not href.startswith(("javascript:", "#")):
                try:
                    self._href, self._link_text = urllib.parse.urljoin(self.base_url, href), []
                except ValueError:  # e.g. "http://[broken": not a link to follow
                    pass
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self._in_time()
        if tag in ("script", "style", "noscript", "svg"):
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag == "a" and self._href is not None:
            n = self._ids.setdefault(self._href, len(self._ids))  # a link seen before keeps its id
            self.links[n] = self._href
            text = " ".join("".join(self._link_text).split()) or self._href
            domain = urllib.parse.urlsplit(self._href).netloc
            elsewhere = domain and domain != self.domain
            self.parts.append(f"【{n}†{marker_text(text)}{'†' + marker_text(domain) if elsewhere else ''}】")
            self._href = None
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_comment(self, data):
        self._in_time()

    def handle_data(self, data):
        self._in_time()
        if self._skip:
            return
        data = defused(data)
        if self._in_title:
            self.title += data
        elif self._href is not None:
            self._link_text.append(data)
        else:
            self.parts.append(data)


# The characters of the tool's own markers (【n†link】, citations), as a page's text has them: the
# model must not read a page's 【0†...】 as a link the tool numbered (OpenAI's page_contents.py).
_MARKER_LOOKALIKES = str.maketrans({"【": "〖", "】": "〗", "◼": "◾", "\u200b": ""})


def defused(text: str) -> str:
    """A page's or a search result's own text, with no character of the tool's markers."""
    return text.translate(_MARKER_LOOKALIKES)


def marker_text(text: str) -> str:
    """A part of a link's marker (its text, a URL, a domain): † separates the parts, so a page's
    own would split the marker."""
    return defused(text).replace("†", "‡")


def _wrap(text: str) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            lines += textwrap.wrap(paragraph, LINE_WIDTH, break_on_hyphens=False)
    return lines


def fetch_page(url: str, client: WebClient | None = None, source: bool = False) -> Page:
    """GET a URL and turn it into a Page (HTML to text; other text types as they are; with
    ``source``, HTML as it is too: ``open``'s ``view_source``)."""
    response = (client or WebClient()).request(url)
    kind = response.headers.get_content_type()
    text = _decode(response.body, response.headers.get_content_charset())
    if response.truncated:
        text += f"\n\n[truncated: the page is longer than {len(response.body)} bytes]"
    sniffed_html = text.lstrip()[:15].lower().startswith(("<!doctype html", "<html"))
    if (kind in ("text/html", "application/xhtml+xml") or sniffed_html) and source:
        return Page(response.url, f"Source of {response.url}"[:MAX_TITLE], _wrap(defused(text)))
    if kind in ("text/html", "application/xhtml+xml") or sniffed_html:
        parser = _TextExtractor(response.url, time.monotonic() + PARSE_S)
        try:
            parser.feed(text)
            parser.close()
        except _OutOfTime:
            parser.parts.append(f"\n[the rest of the page is not shown: its HTML took more than "
                                f"{PARSE_S:g} s to read]")
        except Exception as e:  # noqa: BLE001 - the parser's own failures (AssertionError)
            parser.parts.append(f"\n[the rest of the page is not shown: its HTML is malformed "
                                f"({type(e).__name__})]")
        title = " ".join(parser.title.split())[:MAX_TITLE] or response.url
        return Page(response.url, title, _wrap("".join(parser.parts)), parser.links)
    if not (kind.startswith("text/") or kind in ("application/json", "application/xml")
            or kind.endswith(("+json", "+xml"))):
        raise ToolError(f"{url}: cannot show content of type {kind}")
    return Page(response.url, response.url, _wrap(defused(text)))


def _decode(body: bytes, charset: str | None) -> str:
    """Text in the declared charset; UTF-8 when it is unknown or not a text encoding."""
    try:
        return body.decode(charset or "utf-8", "replace")
    except (LookupError, ValueError):
        return body.decode("utf-8", "replace")


# The arguments of each function, as harmony declares them (gpt-oss.md 5).
PARAMETERS = {
    "search": {"query": {"type": "string"}, "topn": {"type": "integer"},
               "source": {"type": ["string", "null"]}},
    "open": {"id": {"type": ["integer", "string"]}, "cursor": {"type": "integer"},
             "loc": {"type": "integer"}, "num_lines": {"type": "integer"},
             "view_source": {"type": "boolean"}, "source": {"type": ["string", "null"]}},
    "find": {"pattern": {"type": "string"}, "cursor": {"type": "integer"}},
}
REQUIRED = {"search": ["query"], "find": ["pattern"]}


class Browser:
    """``allow_private`` lets pages on loopback and private networks be opened (the CLI's
    ``--browser-allow-private``); by default only public addresses are."""

    def __init__(self, backend: SearchBackend | None = None, fetch: Callable[[str], Page] | None = None,
                 view_lines: int = VIEW_LINES, allow_private: bool = False):
        client = WebClient(allow_private=allow_private)
        self.allow_private = allow_private
        self.backend = backend if backend is not None else default_backend(client)
        self.fetch = fetch or (lambda url: fetch_page(url, client))
        # open(view_source=True): the page's HTML as it is (it showed the rendered text, helper-157)
        self.fetch_source = fetch or (lambda url: fetch_page(url, client, source=True))
        self.view_lines = view_lines
        self.pages: list[Page] = []

    def new_session(self) -> None:
        """A new conversation's: no pages open (a cursor of the last one's means nothing here)."""
        self.pages = []

    def call(self, function: str, arguments: dict) -> str:
        """``browser.<function>`` with parsed arguments; ToolError for a bad call."""
        method = {"search": self.search, "open": self.open, "find": self.find}.get(function)
        if method is None:
            raise ToolError(f"the browser has no function {function!r} (search, open, find)")
        schema = {"type": "object", "properties": PARAMETERS[function],
                  "required": REQUIRED.get(function, []), "additionalProperties": False}
        try:
            validate(arguments, schema)
        except ToolError as e:
            raise ToolError(f"browser.{function}: {e}") from None
        return method(**arguments)

    # -- the three functions
    def search(self, query: str, topn: int = 10, source: str | None = None) -> str:
        if self.backend is None:
            raise ToolError("no search backend is configured (set EXA_API_KEY); browser.open "
                            "with a URL still works")
        results = self.backend.search(query, max(1, min(topn, 20)))
        lines, links = [], {}
        for n, r in enumerate(results):
            links[n] = r.url
            domain = urllib.parse.urlsplit(r.url).netloc or r.url
            lines.append(f"【{n}†{marker_text(r.title[:MAX_TITLE])}†{marker_text(domain)}】")
            lines += _wrap(defused(r.snippet))
        title = f"Search results for {query[:MAX_TITLE]!r}"
        page = Page(f"search:{query}", title, lines or ["No results."], links)
        return self._push_and_show(page, 0, -1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        fetch = self.fetch_source if view_source else self.fetch
        if isinstance(id, str) and id not in ("", "-1"):
            return self._push_and_show(fetch(id), max(loc, 0), num_lines)
        page_index = self._page_index(cursor)
        page = self.pages[page_index]
        if view_source and not (isinstance(id, int) and id >= 0):  # the page itself, as its source
            if not page.url.startswith(("http://", "https://")):
                raise ToolError(f"page {page_index} is a list of results: it has no source to view")
            return self._push_and_show(fetch(page.url), max(loc, 0), num_lines)
        if isinstance(id, int) and id >= 0:
            if id in page.matches:  # a find result: its page as it was read, from a few lines above the match
                found, line = page.matches[id]
                return self._push_and_show(found, max(line - 4, 0) if loc < 0 else loc, num_lines)
            if id not in page.links:
                raise ToolError(f"page {page_index} has no link {id}")
            return self._push_and_show(fetch(page.links[id]), max(loc, 0), num_lines)
        return self._show(page_index, max(loc, 0), num_lines)  # scroll the page

    def find(self, pattern: str, cursor: int = -1) -> str:
        page_index = self._page_index(cursor)
        page = self.pages[page_index]
        if page.url.startswith(("search:", "find:")):  # (as OpenAI's browser: a page of results has no text to search)
            raise ToolError(f"page {page_index} is a list of results: open one of them, then find in it")
        matches = [i for i, line in enumerate(page.lines) if pattern.lower() in line.lower()]
        hits = [f"【{k}†match at L{i}】 {page.lines[i]}" for k, i in enumerate(matches)]
        shown = repr(pattern[:MAX_TITLE])
        found = Page(f"find:{pattern[:MAX_TITLE]}:{page.url}", f"Find results for {shown} in {page.title}",
                     hits or [f"No matches for {shown}."])
        found.links = {k: page.url for k in range(len(matches))}
        found.matches = {k: (page, i) for k, i in enumerate(matches)}
        return self._push_and_show(found, 0, -1)

    # -- pages
    def _page_index(self, cursor: int) -> int:
        if not self.pages:
            raise ToolError("no page is open yet: search or open a URL first")
        if cursor == -1:
            return len(self.pages) - 1
        if not 0 <= cursor < len(self.pages):
            raise ToolError(f"no page with cursor {cursor} (0..{len(self.pages) - 1})")
        return cursor

    def _push_and_show(self, page: Page, loc: int, num_lines: int) -> str:
        self.pages.append(page)
        return self._show(len(self.pages) - 1, loc, num_lines)

    def _show(self, cursor: int, loc: int, num_lines: int) -> str:
        page = self.pages[cursor]
        n = len(page.lines)
        count = self.view_lines if num_lines <= 0 else min(num_lines, MAX_VIEW_LINES)
        start = min(loc, max(n - 1, 0))
        end = min(n, start + count)
        domain = urllib.parse.urlsplit(page.url).netloc or page.url.split(":")[0]
        head = f"[{cursor}] {page.title} ({domain})\n**viewing lines [{start} - {max(end - 1, start)}] of {max(n - 1, 0)}**\n"
        body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(start, end))
        return f"{head}\n{body}"


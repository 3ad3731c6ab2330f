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
"""

from __future__ import annotations

import json
import os
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Callable, Protocol

from .functions import ToolError

LINE_WIDTH = 100
VIEW_LINES = 60  # lines shown per view (the reference shows about 1024 tokens)
MAX_BYTES = 2_000_000


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str = ""


class SearchBackend(Protocol):
    def search(self, query: str, topn: int) -> list[SearchResult]: ...


class ExaBackend:
    """Exa's search API (https://exa.ai); the key comes from ``EXA_API_KEY``."""

    URL = "https://api.exa.ai/search"

    def __init__(self, api_key: str, timeout: float = 20.0):
        self.api_key, self.timeout = api_key, timeout

    def search(self, query: str, topn: int) -> list[SearchResult]:
        body = json.dumps({"query": query, "numResults": topn,
                           "contents": {"text": {"maxCharacters": 600}}}).encode()
        request = urllib.request.Request(self.URL, body, {"x-api-key": self.api_key,
                                                          "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            data = json.load(response)
        return [SearchResult(r.get("title") or r.get("url", ""), r.get("url", ""), r.get("text") or "")
                for r in data.get("results", [])]


def default_backend() -> SearchBackend | None:
    key = os.environ.get("EXA_API_KEY")
    return ExaBackend(key) if key else None


@dataclass
class Page:
    url: str
    title: str
    lines: list[str]
    links: dict[int, str] = field(default_factory=dict)  # link number -> URL


class _TextExtractor(HTMLParser):
    """HTML -> text lines with numbered links; script/style skipped."""

    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "header", "footer", "pre", "blockquote", "hr", "dt", "dd"}

    def __init__(self, base_url: str):
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.parts: list[str] = []
        self.title = ""
        self.links: dict[int, str] = {}
        self._skip = 0
        self._in_title = False
        self._href: str | None = None
        self._link_text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript", "svg"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "a":
            href = dict(attrs).get("href")
            if href and not href.startswith(("javascript:", "#")):
                self._href, self._link_text = urllib.parse.urljoin(self.base_url, href), []
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript", "svg"):
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag == "a" and self._href is not None:
            n = len(self.links)
            self.links[n] = self._href
            text = " ".join("".join(self._link_text).split()) or self._href
            self.parts.append(f"【{n}†{text}】")
            self._href = None
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._skip:
            return
        if self._in_title:
            self.title += data
        elif self._href is not None:
            self._link_text.append(data)
        else:
            self.parts.append(data)


def _wrap(text: str) -> list[str]:
    lines = []
    for paragraph in text.split("\n"):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            lines += textwrap.wrap(paragraph, LINE_WIDTH, break_long_words=False, break_on_hyphens=False)
    return lines


def fetch_page(url: str, timeout: float = 20.0) -> Page:
    """GET a URL and turn it into a Page (HTML to text; other text types as they are)."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ToolError(f"only http(s) URLs can be opened, not {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "gptoss-mlx browser"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(MAX_BYTES + 1)
            kind = response.headers.get_content_type()
            charset = response.headers.get_content_charset() or "utf-8"
            final_url = response.geturl()
    except urllib.error.HTTPError as e:
        raise ToolError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ToolError(f"{url}: could not be fetched ({getattr(e, 'reason', e)})") from None
    text = raw[:MAX_BYTES].decode(charset, "replace")
    if kind == "text/html" or text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
        parser = _TextExtractor(final_url)
        parser.feed(text)
        title = " ".join(parser.title.split()) or final_url
        return Page(final_url, title, _wrap("".join(parser.parts)), parser.links)
    if not kind.startswith("text/") and kind not in ("application/json", "application/xml"):
        raise ToolError(f"{url}: cannot show content of type {kind}")
    return Page(final_url, final_url, _wrap(text))


class Browser:
    def __init__(self, backend: SearchBackend | None = None,
                 fetch: Callable[[str], Page] = fetch_page, view_lines: int = VIEW_LINES):
        self.backend = backend if backend is not None else default_backend()
        self.fetch = fetch
        self.view_lines = view_lines
        self.pages: list[Page] = []

    def call(self, function: str, arguments: dict) -> str:
        """``browser.<function>`` with parsed arguments; ToolError for a bad call."""
        method = {"search": self.search, "open": self.open, "find": self.find}.get(function)
        if method is None:
            raise ToolError(f"the browser has no function {function!r} (search, open, find)")
        try:
            return method(**arguments)
        except TypeError as e:
            raise ToolError(f"browser.{function}: {e}") from None

    # -- the three functions
    def search(self, query: str, topn: int = 10, source: str | None = None) -> str:
        if self.backend is None:
            raise ToolError("no search backend is configured (set EXA_API_KEY); browser.open "
                            "with a URL still works")
        try:
            results = self.backend.search(query, max(1, min(int(topn), 20)))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ToolError(f"the search failed: {e}") from None
        lines, links = [], {}
        for n, r in enumerate(results):
            links[n] = r.url
            domain = urllib.parse.urlparse(r.url).netloc
            lines.append(f"【{n}†{r.title}†{domain}】")
            lines += _wrap(r.snippet)
        page = Page(f"search:{query}", f"Search results for {query!r}", lines or ["No results."], links)
        return self._push_and_show(page, 0, -1)

    def open(self, id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
             view_source: bool = False, source: str | None = None) -> str:
        if isinstance(id, str) and id not in ("", "-1"):
            return self._push_and_show(self.fetch(id), max(loc, 0), num_lines)
        page_index = self._page_index(cursor)
        page = self.pages[page_index]
        if isinstance(id, (int, float)) and int(id) >= 0:
            if int(id) not in page.links:
                raise ToolError(f"page {page_index} has no link {int(id)}")
            return self._push_and_show(self.fetch(page.links[int(id)]), max(loc, 0), num_lines)
        return self._show(page_index, max(loc, 0), num_lines)  # scroll the page

    def find(self, pattern: str, cursor: int = -1) -> str:
        page_index = self._page_index(cursor)
        page = self.pages[page_index]
        matches = [i for i, line in enumerate(page.lines) if pattern.lower() in line.lower()]
        hits = [f"【{k}†match at L{i}】 {page.lines[i]}" for k, i in enumerate(matches)]
        found = Page(f"find:{pattern}:{page.url}", f"Find results for {pattern!r} in {page.title}",
                     hits or [f"No matches for {pattern!r}."])
        found.links = {k: page.url for k in range(len(matches))}
        return self._push_and_show(found, 0, -1)

    # -- pages
    def _page_index(self, cursor: int) -> int:
        if not self.pages:
            raise ToolError("no page is open yet: search or open a URL first")
        cursor = int(cursor)
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
        count = self.view_lines if num_lines is None or int(num_lines) <= 0 else int(num_lines)
        start = min(int(loc), max(n - 1, 0))
        end = min(n, start + count)
        domain = urllib.parse.urlparse(page.url).netloc or page.url.split(":")[0]
        head = f"[{cursor}] {page.title} ({domain})\n**viewing lines [{start} - {max(end - 1, start)}] of {max(n - 1, 0)}**\n"
        body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(start, end))
        return f"{head}\n{body}"


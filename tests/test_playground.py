"""The browser playground of ``gptoss-mlx serve`` (``/``), in a real browser: Debian's headless
chromium driven through chromedriver (Selenium), against a real uvicorn server on 127.0.0.1.
The tiny random checkpoint streams and is stopped end to end; a scripted model stands in where
random weights cannot reach a path (reasoning, tool calls, hostile text). Screenshots go to
$GPTOSS_MLX_SCREENSHOTS when it is set (the closing note's), else to the test's tmp dir."""

from __future__ import annotations

import json
import re
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_mlx.chat import Chat
from gptoss_mlx.generate import SamplingParams
from gptoss_mlx.harmony import Message
from gptoss_mlx.server.playground import CSP
from gptoss_mlx.server.tools import ServerTools
from gptoss_mlx.store import ConversationStore
from gptoss_mlx.tools import FunctionTool, SandboxLimits
from scripted import ScriptedModel
from test_server import JSON_VALUES, MESSAGE, answer, call, script, serving, tiny, tok  # noqa: F401 (fixtures)

STATIC = Path(__file__).parent.parent / "gptoss_mlx" / "server" / "playground" / "static"
WEATHER_TOOL = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
IMG = "<img src=x onerror=\"document.body.dataset.pwned='img'\">"
SCRIPT = "<script>document.body.dataset.pwned='script'</script>"


# ---- the browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless chromium: skip without it, but fail in CI, where .ci/run installs it."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        problem = "chromium and chromedriver not found (apt-get install chromium chromium-driver)"
        if os.environ.get("GPTOSS_MLX_REQUIRE_TOOLCHAIN") == "1":
            pytest.fail(f"{problem}, and GPTOSS_MLX_REQUIRE_TOOLCHAIN=1")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=DriverService(executable_path=driver), options=options)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("GPTOSS_MLX_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(browser, name):
        browser.save_screenshot(str(folder / f"{name}.png"))
    return shoot


class Page:
    """The playground in the browser, at a server's root."""

    def __init__(self, browser, url: str, ready: bool = True, path: str = "/"):
        """``ready``: wait until the page has loaded the server's info and its chats."""
        from selenium.webdriver.support.ui import WebDriverWait

        self.b, self.root = browser, url.removesuffix("/v1")
        self.wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        browser.set_window_size(1100, 800)
        browser.get(self.root + path)
        if ready:
            self.wait_ready()

    def wait_ready(self):
        self.until(lambda: self.js("return document.body.dataset.ready === 'true'"), "the page never got ready")

    def js(self, code, *args):
        return self.b.execute_script(code, *args)

    def until(self, check, message=""):
        from selenium.common.exceptions import TimeoutException

        try:
            return self.wait.until(lambda _: check())
        except TimeoutException:
            raise AssertionError(f"{message}; the page shows: {self.text('body')!r}; "
                                 f"console: {self.errors()}") from None

    def find(self, css):
        return self.b.find_element("css selector", css)

    def all(self, css):
        return self.b.find_elements("css selector", css)

    def send(self, text):
        from selenium.webdriver.common.keys import Keys

        box = self.find("#prompt")
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def replies(self):
        return self.all(".turn.assistant")

    def wait_reply(self, n):
        """The n-th reply generated in this page (from 1), once it has ended: its stats line
        is shown (replies of a reopened chat have none)."""
        self.until(lambda: len(self.all(".turn.assistant .stats")) >= n, f"reply {n} never ended")
        return self.all(".turn.assistant .stats")[n - 1].find_element("xpath", "..")

    def text(self, css="#messages"):
        return self.js("return document.querySelector(arguments[0]).textContent", css)

    def errors(self):
        """The browser console's errors (a failed request, a script error) of this page's server
        (not a request the page of an earlier test, on a server gone since, still had under way)."""
        return [e["message"] for e in self.b.get_log("browser") if e["level"] == "SEVERE"
                and (e["message"].startswith(self.root) or not re.match(r"https?://", e["message"]))]


# ---- servers ----------------------------------------------------------------------------------

def get(url, path, headers=None):
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def call_api(url, method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# Records, at every change of the conversation, whether the reasoning section is open and
# whether answer text is shown.
WATCH_REASONING = """
window.seen = [];
new MutationObserver(() => {
  const reasoning = document.querySelector('.turn.assistant details.reasoning');
  const answer = document.querySelector('.turn.assistant .answer');
  if (reasoning && reasoning.querySelector('div').textContent) {
    window.seen.push([reasoning.open, Boolean(answer && answer.textContent)]);
  }
}).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
"""


def prompts(tok, model) -> str:
    return tok.decode(model.fed)


# ---- the real tiny model, end to end ------------------------------------------------------------

def test_tiny_model_streams_a_reply_with_stats_and_stops_mid_reply(browser, tiny, tmp_path, shots, monkeypatch):
    # The random model's reply, and so how it streams, follows the prompt, whose system message
    # holds today's date: a date whose reply streams a delta a token (others hold text back).
    from gptoss_mlx import harmony

    monkeypatch.setattr(harmony, "today", lambda: "2026-12-07")
    chats = ConversationStore(tmp_path)
    with serving(*tiny, chats=chats, sampling=SamplingParams(max_tokens=24, temperature=0)) as url:
        page = Page(browser, url)
        assert page.find("#model").text == "gpt-oss-tiny"
        page.send("Hello there")
        reply = page.wait_reply(1)
        stats = reply.find_element("css selector", ".stats").text
        assert stats.startswith("24 tokens · ") and "tok/s" in stats and "TTFT" in stats, stats
        assert "cut off: token limit" in stats
        shots(browser, "1-tiny-model-reply")
        [entry] = chats.list()
        assert entry.title == "Hello there" and entry.messages == 2  # saved after the reply

    with serving(*tiny, chats=chats, sampling=SamplingParams(max_tokens=3000, temperature=0)) as url:
        page = Page(browser, url)
        page.send("Now talk for a long time")
        page.until(lambda: len(page.js("return document.querySelector('.turn.assistant')?.textContent || ''")) > 20,
                   "nothing streamed")
        assert page.find("#stop").is_displayed() and not page.find("#send").is_displayed()
        from selenium.webdriver.common.keys import Keys

        page.find("#prompt").send_keys(Keys.ESCAPE)  # Esc stops
        reply = page.wait_reply(1)
        stats = reply.find_element("css selector", ".stats").text
        # no usage for a stopped reply: no count guessed from the deltas (it was a third too low)
        assert re.fullmatch(r"TTFT \d+\.\d\ds · stopped", stats), stats
        assert page.find("#send").is_displayed() and not page.find("#stop").is_displayed()
        shots(browser, "5-stopped-mid-reply")
        shown = page.text(".turn.assistant .answer")
        page.until(lambda: len(chats.list()) == 2, "the stopped reply was not saved")
        saved = json.loads((chats.root / f"{chats.list()[0].id}.json").read_text())
        assert saved["messages"][0] == {"role": "user", "content": "Now talk for a long time"}
        assert saved["messages"][1]["content"]  # the partial answer is kept...
        page.find("#new-chat").click()
        page.until(lambda: not page.replies())
        # ...and shows again as it was when reopened (clicked in the page: the list is drawn again
        # as New chat and the save end, and a row found before could be stale by its click)
        page.js("document.querySelector('#chats .open').click();")
        page.until(lambda: page.replies() and page.text(".turn.assistant .answer") == shown)
        assert not page.errors()


# ---- a scripted model: reasoning, effort, tools, hostile text ----------------------------------

class SlowScriptedModel(ScriptedModel):
    """A scripted model at a few tokens a second, so the page can be seen mid-reply."""

    def __call__(self, inputs, cache=None, **kw):
        time.sleep(0.08)
        return super().__call__(inputs, cache, **kw)


class SlowStart(ScriptedModel):
    """A scripted model whose prompts take a second to read, its tokens a twentieth."""

    def __call__(self, inputs, cache=None, **kw):
        time.sleep(1.0 if inputs.shape[1] > 1 else 0.05)
        return super().__call__(inputs, cache, **kw)


def test_a_stop_before_the_first_token_leaves_no_turn_and_the_open_chat_is_kept_while_it_replies(
        browser, tok, tmp_path):
    """Testers' (helper-143): a stop before the first token took the user's turn back but left an
    assistant turn reading "stopped" (two stops: two such turns, none in the saved chat); and
    the open chat deleted while its reply streamed came back as "(copy)" once the reply ended,
    said to be "deleted elsewhere"."""
    chats = ConversationStore(tmp_path)
    with serving(SlowStart([answer(tok, "Hm.", "ok " * 20)]), tok, chats=chats) as url:
        page = Page(browser, url)
        page.send("first")
        page.wait_reply(1)
        page.until(lambda: len(chats.list()) == 1, "not saved")
        for _ in range(2):
            page.send("second")
            page.until(lambda: page.find("#stop").is_displayed(), "no reply began")
            page.find("#stop").click()
            page.until(lambda: page.find("#send").is_displayed(), "the reply never stopped")
            page.until(lambda: page.find("#prompt").get_attribute("value") == "second", "the prompt did not come back")
            assert len(page.replies()) == 1 and len(page.all(".turn.user")) == 1
            page.find("#prompt").clear()
        page.send("third")
        page.until(lambda: page.find("#stop").is_displayed(), "no reply began")
        for _ in range(2):
            page.js("document.querySelector('#chats li.current .delete').click();")
        assert page.find("#alert").text == "A reply is being written: stop it to delete this chat"
        page.wait_reply(2)
        page.until(lambda: chats.list()[0].messages == 4, "the reply was not saved")
        assert [e.title for e in chats.list()] == ["first"]


def test_reasoning_streams_then_folds_and_markdown_renders(browser, tok, tmp_path, shots):
    model = SlowScriptedModel([answer(tok, "The user asks about **sorting**. Use sorted().",
                                  "## Sorting\n\nUse `sorted()`:\n\n```python\nnums = [3, 1, 2]\n"
                                  "print(sorted(nums))  # [1, 2, 3]\n```\n\n- stable\n- *O(n log n)*\n\n"
                                  "See [the docs](https://docs.python.org/3/howto/sorting.html).")])
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = Page(browser, url)
        page.js(WATCH_REASONING)
        page.send("How do I sort a list?")
        page.until(lambda: "Reasoning · thinking… (" in page.text(".turn.assistant")
                   and not page.all(".turn.assistant .answer"), "no live reasoning")
        shots(browser, "2a-reasoning-streaming")
        reply = page.wait_reply(1)
        seen = page.js("return window.seen")  # (reasoning open?, answer shown?) at each change
        assert [True, False] in seen and seen[-1] == [False, True]  # open while it streamed alone
        reasoning = reply.find_element("css selector", "details.reasoning")
        assert reasoning.get_attribute("open") is None  # folded once the answer started
        assert reasoning.find_element("css selector", "summary").text == "Reasoning · 7 words"
        answer_node = reply.find_element("css selector", ".answer")
        assert answer_node.find_element("css selector", "h4").text == "Sorting"
        code = answer_node.find_element("css selector", "pre.code")
        assert "print(sorted(nums))" in code.text
        assert code.find_elements("css selector", ".tok-comment")[0].text == "# [1, 2, 3]"
        assert [li.text for li in answer_node.find_elements("css selector", "li")] == ["stable", "O(n log n)"]
        link = answer_node.find_element("css selector", "a")
        assert link.get_attribute("href") == "https://docs.python.org/3/howto/sorting.html"
        assert link.get_attribute("rel") == "noopener noreferrer nofollow"
        reasoning.find_element("css selector", "summary").click()  # re-open it
        assert "Use sorted()." in reasoning.text
        shots(browser, "2b-reply-with-reasoning-and-markdown")


def test_effort_is_always_visible_and_applies_to_the_next_reply(browser, tok, tmp_path, shots):
    model = ScriptedModel([answer(tok, "Hm.", "First."), answer(tok, "Think hard.", "Second.")])
    chats = ConversationStore(tmp_path)
    with serving(model, tok, chats=chats) as url:
        page = Page(browser, url)
        checked = lambda: [b.text for b in page.all("#effort button[aria-checked='true']")]  # noqa: E731
        assert checked() == ["medium"]
        page.send("One")
        page.wait_reply(1)
        assert "Reasoning: medium" in prompts(tok, model)
        page.find("#effort button[data-effort='high']").click()
        assert checked() == ["high"]
        page.send("Two")
        page.wait_reply(2)
        last_prompt = prompts(tok, model).rsplit("<|start|>system", 1)[-1]
        assert "Reasoning: high" in last_prompt
        shots(browser, "3-effort-switched-to-high")
        page.until(lambda: json.loads((chats.root / f"{chats.list()[0].id}.json").read_text())
                   ["reasoning_effort"] == "high", "the effort was not saved with the chat")


def test_a_function_tool_from_a_pasted_schema_shows_its_row_and_takes_a_result(browser, tok, tmp_path, shots):
    model = ScriptedModel([call(tok, "I need the weather.", "get_weather", '{"city": "Oslo"}'),
                           answer(tok, "The tool said rain.", '{"sky": "rainy"}')])
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = Page(browser, url)
        page.find("#settings-toggle").click()
        page.find("#tools").send_keys(json.dumps(WEATHER_TOOL))
        page.find("#instructions").send_keys("Answer in one sentence.")
        page.find("#schema").send_keys('{"type": "object", "properties": {"sky": {"type": "string"}}}')
        page.send("Weather in Oslo?")
        reply = page.wait_reply(1)
        row = reply.find_element("css selector", "details.tool")
        assert row.find_element("css selector", "summary").text == "tool call · get_weather"
        assert json.loads(row.find_element("css selector", "pre").text) == {"city": "Oslo"}
        page.find("#settings-toggle").click()  # folded away, to show the row
        shots(browser, "4a-function-call-row-waiting-for-its-result")
        row.find_element("css selector", "textarea").send_keys("rain, 12 C")
        reply.find_element("css selector", ".send-results").click()
        second = page.wait_reply(2)
        assert second.find_element("css selector", ".answer").text == '{"sky": "rainy"}'  # the schema's shape
        prompt = prompts(tok, model)
        assert "functions.get_weather to=assistant<|channel|>commentary<|message|>rain, 12 C" in prompt
        assert "Answer in one sentence." in prompt and "type get_weather" in prompt
        assert '# Response Formats\n\n## output\n\n{"type":"object","properties":{"sky":{"type":"string"}}}' in prompt
        assert row.find_element("css selector", ".result").text == "rain, 12 C"
        shots(browser, "4b-function-call-answered")


def test_server_python_shows_the_code_that_ran_and_the_header_says_why(browser, tok, tmp_path, shots, os_sandbox):
    model = ScriptedModel([script(tok, "<|channel|>analysis<|message|>Compute it.<|end|><|start|>assistant"
                                       "<|channel|>analysis to=python<|message|>print(6 * 7)<|call|>"),
                           answer(tok, "It printed 42.", "The answer is 42.")])
    chats = ConversationStore(tmp_path)
    with serving(model, tok, chats=chats, tools=ServerTools(python=SandboxLimits())) as url:
        page = Page(browser, url)
        notice = page.find("#notice").text
        assert "python runs on this server without asking" in notice and "--tools python" in notice
        page.send("What is 6*7?")
        reply = page.wait_reply(1)
        row = reply.find_element("css selector", "details.tool")
        row.find_element("css selector", "summary").click()
        assert row.find_element("css selector", "summary").text == "tool call · python · run by the server · done"
        assert row.find_element("css selector", "pre.code").text == "print(6 * 7)"
        assert row.find_element("css selector", ".result").text.strip() == "42"
        assert "code that ran (without asking: --tools python)" in row.text
        assert reply.find_element("css selector", ".answer").text == "The answer is 42."
        shots(browser, "4c-server-python-row")
        # the saved chat holds the call and its result, as the TUI saves them, and goes on
        page.send("Thanks")
        page.wait_reply(2)
        assert not reply.find_elements("css selector", ".error")
        saved = Chat(model, tok)
        chats.load(saved, chats.list()[0].id)
        ran = [(m.recipient, m.text) for m in saved.messages if m.is_tool_call]
        assert ran == [("python", "print(6 * 7)")]
        assert [(m.name, m.text.strip()) for m in saved.messages if m.role == "tool"] == [("python", "42")]


def test_model_and_tool_text_never_becomes_html(browser, tok, tmp_path, shots):
    hostile = f"{IMG} {SCRIPT} [click](javascript:document.body.dataset.pwned='link') **{IMG}**"

    def leak(a: int, x: str = "") -> str:
        """Return a web page."""
        return f"<html>{SCRIPT}{IMG}</html>"

    model = ScriptedModel([script(tok, f"<|channel|>analysis<|message|>{hostile}<|end|><|start|>assistant"
                                       f"<|channel|>commentary to=functions.leak <|constrain|>json<|message|>"
                                       f'{{"a": 1, "x": "{SCRIPT}"}}<|call|>'),
                           answer(tok, hostile, f"# {IMG}\n\n{hostile}\n\n```html\n{SCRIPT}\n```\n\n| a | b |\n|---|---|\n| {IMG} | {SCRIPT} |")])
    chats = ConversationStore(tmp_path)
    with serving(model, tok, chats=chats, tools=ServerTools(functions=[FunctionTool.from_callable(leak)])) as url:
        page = Page(browser, url)
        page.send(f"Say {IMG}")
        page.wait_reply(1)
        for details in page.all("details"):
            if details.get_attribute("open") is None:
                details.find_element("css selector", "summary").click()
        injected = page.js("return document.querySelectorAll('#messages img, #messages script, #messages iframe, "
                           "#messages [onerror], #messages a[href^=javascript]').length")
        assert injected == 0
        assert page.js("return document.body.dataset.pwned") is None
        text = page.text()
        assert text.count(IMG) >= 6 and text.count(SCRIPT) >= 5  # shown as the text it is
        assert f"<html>{SCRIPT}{IMG}</html>" in page.find("details.tool .result").text
        browser.set_window_size(1100, 1500)  # the whole reply in one picture
        shots(browser, "6-injection-stays-text")
        browser.set_window_size(1100, 800)
        # a hostile title in the list stays text too
        chat_id = chats.list()[0].id
        assert call_api(url.removesuffix("/v1"), "PATCH", f"/v1/playground/chats/{chat_id}",
                        {"title": SCRIPT + IMG})[0] == 200
        page.b.refresh()
        page.wait_ready()
        assert page.find("#chats .open").text == SCRIPT + IMG
        assert page.js("return document.querySelectorAll('#chats img, #chats script').length") == 0
        assert page.js("return document.body.dataset.pwned") is None


def test_a_call_waiting_for_its_result_asks_for_it_again_when_the_chat_is_reopened(browser, tok, tmp_path):
    """After a reload, the row of a call of the page's function had no result box: the call
    could never be answered, and the next message went out with it dangling."""
    model = ScriptedModel([call(tok, "I need the weather.", "get_weather", '{"city": "Oslo"}'),
                           answer(tok, "The tool said rain.", "Rainy.")])
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = Page(browser, url)
        page.find("#settings-toggle").click()
        page.find("#tools").send_keys(json.dumps(WEATHER_TOOL))
        page.find("#settings-toggle").click()
        page.send("Weather in Oslo?")
        page.wait_reply(1).find_element("css selector", "details.tool textarea")
        page.until(lambda: "#chat=" in page.js("return location.hash"), "the chat was not saved")
        browser.refresh()
        page.wait_ready()
        page.until(lambda: page.all(".turn.assistant details.tool textarea"), "no result box after the reload")
        page.find(".turn.assistant details.tool textarea").send_keys("rain, 12 C")
        page.find(".send-results").click()
        page.until(lambda: "Rainy." in page.text(), "the model did not go on")
        assert "functions.get_weather to=assistant<|channel|>commentary<|message|>rain, 12 C" in prompts(tok, model)
        assert page.errors() == []


def open_saved(browser, url, messages) -> Page:
    """The page showing a chat saved through the chat endpoints (as a file written by hand is)."""
    status, made = call_api(url.removesuffix("/v1"), "POST", "/v1/playground/chats",
                            {"title": "by hand", "messages": messages})
    assert status == 201, made
    page = Page(browser, url, path=f"/#chat={made['id']}")
    page.until(lambda: page.all(".turn"), "the chat was not shown")
    return page


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"},
     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "r"}],  # a call without arguments
    [{"role": "user", "content": "a"},
     {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "name": "f", "content": "r"}],  # a call without an id, its result by name
    [{"role": "tool", "name": "f", "tool_call_id": "zz", "content": "r"}],  # a result first
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "thinking": "deep thought"}],
])
def test_a_saved_chat_the_store_takes_opens_and_goes_on_in_the_page(browser, tok, tmp_path, messages):
    """A tester's chats, accepted by the store (as from a file written by hand): opening the one
    without arguments threw in markdown.js, and each sent nothing but 400s from then on."""
    model = ScriptedModel([answer(tok, "Hm.", "on we go")])
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = open_saved(browser, url, messages)
        if "thinking" in messages[-1]:
            assert "deep thought" in page.text()
        page.send("and now?")
        page.until(lambda: "on we go" in page.text(), "no reply")
        assert page.errors() == []


@pytest.mark.parametrize("calls, results, asked, shown", [
    # a call without an id answered by name: it was asked for again, and the model got two results
    ([{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
     [{"role": "tool", "name": "get_weather", "content": "sunny"}], [], {"get_weather": "sunny"}),
    # a made-up id for the call without one was the other call's real id: "noon" went to
    # get_weather, and get_time was never asked for
    ([{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
      {"id": "call_1_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
     [{"role": "tool", "tool_call_id": "call_1_0", "name": "get_time", "content": "noon"}], ["get_weather"],
     {"get_time": "noon"}),
])
def test_results_of_a_saved_chat_answer_the_calls_they_name(browser, tok, tmp_path, calls, results, asked, shown):
    model = ScriptedModel([answer(tok, "Hm.", "on we go")])
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": calls}, *results]
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = open_saved(browser, url, messages)
        rows = {row.get_attribute("data-name"): row for row in page.all("details.tool")}
        for name, result in shown.items():
            assert page.js("return arguments[0].querySelector('.result').textContent", rows[name]) == result
        assert [row.get_attribute("data-name") for row in page.all("details.tool") if
                row.find_elements("css selector", "textarea")] == asked
        for name in asked:
            rows[name].find_element("css selector", "textarea").send_keys(f"{name} says hi")
        page.send("and now?") if not asked else page.find(".send-results").click()
        page.until(lambda: "on we go" in page.text(), "no reply")
        prompt = prompts(tok, model)
        for name, result in {**shown, **{n: f"{n} says hi" for n in asked}}.items():
            assert prompt.count(f"functions.{name} to=assistant<|channel|>commentary<|message|>") == 1, prompt
            assert f"functions.{name} to=assistant<|channel|>commentary<|message|>{result}<|end|>" in prompt
        assert page.errors() == []


def test_a_result_answers_a_call_of_its_own_turn(browser, tok, tmp_path):
    """A re-attack: a call left open in an earlier turn took the result of a later turn's call
    (the page showed it there and asked for the later call again, then sent two results)."""
    model = ScriptedModel([answer(tok, "Hm.", "on we go")])
    weather = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": None, "tool_calls": [weather]},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": None, "tool_calls": [weather]},
                {"role": "tool", "name": "get_weather", "content": "rain"}]
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = open_saved(browser, url, messages)
        rows = page.all("details.tool")
        assert [page.js("return arguments[0].querySelector('.result')?.textContent ?? null", r) for r in rows] == [
            None, "rain"]
        assert not page.all("textarea[data-call-id]")  # the last call has its result
        page.send("and now?")
        page.until(lambda: "on we go" in page.text(), "no reply")
        assert prompts(tok, model).count("<|message|>rain<|end|>") == 1


def test_a_tui_chat_resumes_in_the_page_and_the_page_chat_opens_in_the_tui(browser, tok, tmp_path, shots):
    chats = ConversationStore(tmp_path)
    model = ScriptedModel([answer(tok, "They asked again.", "Still blue, because of Rayleigh scattering.")])
    tui_chat = Chat(model, tok, instructions="Be brief.", reasoning_effort="low")  # as the TUI saves it
    tui_chat.messages = [Message("user", "Why is the sky blue?"),
                         Message("assistant", "Scattering.", channel="analysis"),
                         Message("assistant", "Rayleigh scattering.", channel="final")]
    chats.save(tui_chat, "20260101-120000-abcdef", "Sky colour")
    other = Chat(model, tok)
    other.messages = [Message("user", "Other chat"), Message("assistant", "Hi.", channel="final")]
    chats.save(other, "20260101-110000-123456", "Another chat")
    (chats.root / "broken.json").write_text("{not json")
    with serving(model, tok, chats=chats) as url:
        page = Page(browser, url)
        page.until(lambda: len(page.all("#chats li")) == 3)
        titles = [li.text.split("\n")[0] for li in page.all("#chats li")]
        assert "Sky colour" in titles and "broken (unreadable)" in [t.split("✎")[0].strip() for t in titles]
        page.all("#chats li")[titles.index("Sky colour")].find_element("css selector", ".open").click()
        page.until(lambda: "Rayleigh scattering." in page.text())
        assert page.all("#effort button[aria-checked='true']")[0].text == "low"
        assert page.find("#instructions").get_attribute("value") == "Be brief."
        page.send("Again?")
        page.wait_reply(1)
        assert "Be brief." in prompts(tok, model) and "Reasoning: low" in prompts(tok, model)
        shots(browser, "7-resumed-tui-chat")
        # the page saved into the same file; the TUI's Chat loads it with the new turn
        resumed = Chat(model, tok)
        page.until(lambda: len(json.loads((chats.root / "20260101-120000-abcdef.json").read_text())["messages"]) == 5,
                   "the new turn was not saved into the TUI chat's file")
        assert chats.load(resumed, "20260101-120000-abcdef") == "Sky colour"
        assert [m.text for m in resumed.messages if m.channel == "final" or m.role == "user"] == [
            "Why is the sky blue?", "Rayleigh scattering.", "Again?", "Still blue, because of Rayleigh scattering."]
        assert resumed.instructions == "Be brief." and resumed.reasoning_effort == "low"

        # rename, then delete, from the list
        from selenium.webdriver.common.keys import Keys

        row = next(li for li in page.all("#chats li") if "Another chat" in li.text)
        row.find_element("css selector", ".rename").click()
        edit = page.find("#chats .title-edit")
        edit.send_keys(Keys.CONTROL, "a")
        edit.send_keys("Renamed in the page", Keys.ENTER)
        page.until(lambda: any(e.title == "Renamed in the page" for e in chats.list()))
        page.until(lambda: "Renamed in the page" in page.text("#chats"))
        row = next(li for li in page.all("#chats li") if "Renamed in the page" in li.text)
        row.find_element("css selector", ".delete").click()
        assert row.find_element("css selector", ".delete").text == "Delete?"  # asks first
        row.find_element("css selector", ".delete").click()
        page.until(lambda: "20260101-110000-123456" not in [e.id for e in chats.list()])


def test_errors_are_shown_and_the_prompt_comes_back(browser, tok, tmp_path, shots):
    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats, max_context=256) as url:
        page = Page(browser, url)
        page.find("#settings-toggle").click()
        page.find("#tools").send_keys('[{"type": "function", "name": ')
        page.send("Hello")
        assert page.find("#settings-error").text.startswith("Function tools: not JSON")
        assert page.find("#prompt").get_attribute("value") == "Hello" and not page.replies()
        page.find("#tools").clear()
        page.find("#schema").send_keys("[]")  # JSON, but no schema: the server's words were about nesting
        page.find("#prompt").clear()
        page.send("Hello")
        assert page.find("#settings-error").text == 'Structured output: a JSON Schema is a JSON object, such as {"type": "object"}'
        page.find("#schema").clear()
        page.find("#prompt").clear()
        page.send("word " * 300)
        page.until(lambda: page.all(".turn.assistant .error"), "no error shown")
        error = page.find(".turn.assistant .error").text
        assert "context limit is 256 tokens" in error, error
        assert page.text(".turn.assistant .stats").endswith("failed")  # not "stopped": nobody stopped it
        assert page.find("#prompt").get_attribute("value").strip() == ("word " * 300).strip()
        assert not page.all(".turn.user") and chats.list() == []  # nothing half-sent is kept
        shots(browser, "9-error-prompt-comes-back")
    page.find("#prompt").clear()
    page.send("Anyone there?")  # the server has stopped: the browser's "Failed to fetch" said nothing
    # (the earlier send's error goes with this send: errors of sends that left no turn piled up as
    # assistant turns without a user turn above them; a tester's, helper-143)
    page.until(lambda: page.all(".turn.assistant .error") and page.all(".turn.assistant .error")[-1].text
               .startswith("cannot reach the server: is gptoss-mlx serve"), "no error shown")
    assert len(page.all(".turn.assistant")) == 1


def test_phone_width_keeps_the_effort_prompt_and_stop_in_reach(browser, tok, tmp_path, shots):
    model = ScriptedModel([answer(tok, "Short.", "A reply that wraps on a narrow screen, with `code` in it.")])
    with serving(model, tok, chats=ConversationStore(tmp_path)) as url:
        page = Page(browser, url)
        browser.set_window_size(390, 844)
        assert not page.find("#sidebar").is_displayed() and page.find("#menu").is_displayed()
        page.send("Hi")
        page.wait_reply(1)
        from selenium.webdriver.common.keys import Keys

        box = page.find("#prompt")
        box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "line two")
        assert box.get_attribute("value") == "line one\nline two"
        box.send_keys(Keys.ENTER)
        page.wait_reply(2)
        assert page.all(".turn.user .bubble")[-1].text == "line one\nline two"
        for css in ("#effort", "#prompt", "#send"):
            assert page.find(css).is_displayed()
        width = page.js("return document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
        shots(browser, "8-phone-width")
        page.find("#menu").click()
        assert page.find("#sidebar").is_displayed()


# ---- the page's files and the chat endpoints, over plain HTTP -------------------------------------

def test_the_page_ships_its_own_files_under_a_strict_csp(tok, tmp_path):
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=ConversationStore(tmp_path)) as url:
        root = url.removesuffix("/v1")
        status, headers, html = get(root, "/")
        assert status == 200 and headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert b"<script>" not in html and b"http" not in html  # nothing inline, nothing fetched elsewhere
        for name in ("app.js", "markdown.js", "style.css", "icon.svg"):
            status, headers, _ = get(root, f"/playground/{name}")
            assert status == 200 and headers["x-content-type-options"] == "nosniff"
        status, _, body = get(root, "/playground/..%2Fapp.py")
        assert status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    for path in STATIC.glob("*.js"):
        source = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{path.name} uses {sink}"


def test_a_chat_too_large_to_save_is_a_413_and_the_file_keeps_what_it_had(tok, tmp_path, monkeypatch):
    """A re-attack: a 1.8 MB body, indented on save, would be a 70 MB file: the save's EFBIG
    came back as a 500 with a traceback in the log."""
    from gptoss_mlx import chat_file

    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        root = url.removesuffix("/v1")
        good = {"title": "T", "messages": [{"role": "user", "content": "hi"}]}
        status, made = call_api(root, "POST", "/v1/playground/chats", good)
        before = chats.path(made["id"]).read_bytes()
        monkeypatch.setattr(chat_file, "MAX_FILE_BYTES", 4096)
        code, data = call_api(root, "PUT", f"/v1/playground/chats/{made['id']}",
                              {**good, "messages": [{"role": "user", "content": "x" * 8192}]})
        assert code == 413 and data["error"]["code"] == "chat_too_large", data
        assert "more than the 0 MB a saved chat may have" in data["error"]["message"]
        assert chats.path(made["id"]).read_bytes() == before


def test_chat_endpoints_validate_ids_bodies_and_keys(tok, tmp_path):
    chats = ConversationStore(tmp_path)
    (tmp_path / "secret.json").write_text('{"messages": []}')  # beside the chats folder
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        root = url.removesuffix("/v1")
        good = {"title": "T", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"}
        status, made = call_api(root, "POST", "/v1/playground/chats", good)
        assert status == 201
        assert call_api(root, "GET", f"/v1/playground/chats/{made['id']}")[1]["reasoning_effort"] == "high"
        for bad_id, status in (("..", 400), ("...", 400), ("..%2Fsecret", 404), ("%2E%2E", 400),
                               ("a%00b", 400), ("nope", 404)):
            code, data = call_api(root, "GET", f"/v1/playground/chats/{bad_id}")
            assert code == status, (bad_id, data)
            assert set(data["error"]) == {"message", "type", "param", "code"}
        for body, message in (({**good, "title": " "}, "'title' must not be empty"),
                              ({**good, "title": 5}, "title must be a string, got 5"),
                              ({**good, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role must be"),
                              ({**good, "reasoning_effort": "max"}, "reasoning_effort must be low or medium or high"),
                              ({**good, "messages": "hi"}, 'messages must be a list, got "hi"')):
            code, data = call_api(root, "PUT", f"/v1/playground/chats/{made['id']}", body)
            assert code == 400 and message in data["error"]["message"], data
        # one line, no control characters, counted once its blank space is gone (helper-143)
        for title, says in (("a\nb", "'title' must be one line without control characters, got '\\n'"),
                            ("a\x00b", "got '\\x00'"), ("x" * 201, "'title' is 201 characters"),
                            ("a\u2028b", "got '\\u2028'")):
            for method, path, body in (("PUT", f"/v1/playground/chats/{made['id']}", {**good, "title": title}),
                                       ("PATCH", f"/v1/playground/chats/{made['id']}", {"title": title}),
                                       ("POST", "/v1/playground/chats", {**good, "title": title})):
                code, data = call_api(root, method, path, body)
                assert code == 400 and says in data["error"]["message"], (method, title, data)
        assert call_api(root, "PATCH", f"/v1/playground/chats/{made['id']}", {"title": " " + "x" * 200})[1]["title"] == "x" * 200
        untitled = {"messages": [{"role": "user", "content": "Why is the sea salty?"}]}
        assert call_api(root, "POST", "/v1/playground/chats", untitled)[1]["title"] == "Why is the sea salty?"
        escaped = {"messages": [{"role": "user", "content": "\x1b[31mred\x07 text"}]}  # its title made without them
        assert call_api(root, "POST", "/v1/playground/chats", escaped)[1]["title"] == "[31mred text"
        assert call_api(root, "PATCH", "/v1/playground/chats/nope", {"title": "x"})[0] == 404
        for bad in ("a" * 300, ".hidden", "é" * 101, "-rf"):  # too long for a file name; a dotfile; an option
            for method, body in (("GET", None), ("PUT", good), ("PATCH", {"title": "x"}), ("DELETE", None)):
                code, data = call_api(root, method, f"/v1/playground/chats/{urllib.parse.quote(bad)}", body)
                assert code == 400 and data["error"]["code"] == "invalid_chat_id", (method, bad, data)
                assert str(tmp_path) not in data["error"]["message"]
        assert call_api(root, "PATCH", f"/v1/playground/chats/{made['id']}", {"title": ""})[0] == 400
        for entry in chats.list():
            assert call_api(root, "DELETE", f"/v1/playground/chats/{entry.id}")[0] == 200
        assert chats.list() == [] and (tmp_path / "secret.json").exists()
        # another site's page may not touch them; a rebinding name may not read them
        code, data = call_api(root, "POST", "/v1/playground/chats", good, {"Origin": "http://evil.example"})
        assert code == 403 and data["error"]["code"] == "forbidden"
        code, _ = call_api(root, "GET", "/v1/playground/chats", headers={"Host": "evil.example"})
        assert code == 403 and chats.list() == []
        assert call_api(root, "GET", "/v1/playground/info", headers={"Host": "evil.example"})[0] == 200
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats, api_key="sesame") as url:
        root = url.removesuffix("/v1")
        assert get(root, "/")[0] == 200  # the page itself holds nothing secret
        assert call_api(root, "GET", "/v1/playground/chats")[0] == 401
        assert call_api(root, "GET", "/v1/playground/info")[0] == 401
        code, data = call_api(root, "GET", "/v1/playground/chats", headers={"Authorization": "Bearer sesame"})
        assert code == 200 and data["data"] == []


def test_a_save_over_a_chat_changed_or_deleted_elsewhere_is_refused(tok, tmp_path):
    """Two tabs (or the page and the TUI) on one chat: the last to save overwrote the other's
    turns without a word, and a chat deleted elsewhere came back. With the version it last saw
    (``base``), a save over a newer or missing file is a 409."""
    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        root = url.removesuffix("/v1")
        chat = {"title": "T", "messages": [{"role": "user", "content": "hi"}]}
        made = call_api(root, "POST", "/v1/playground/chats", chat)[1]
        path = f"/v1/playground/chats/{made['id']}"
        first = call_api(root, "PUT", path, {**chat, "base": made["updated"]})
        assert first[0] == 200 and first[1]["updated"] > made["updated"]
        code, data = call_api(root, "PUT", path, {**chat, "base": made["updated"]})  # the other tab's
        assert (code, data["error"]["code"], data["error"]["param"]) == (409, "chat_changed", "base")
        assert "changed elsewhere" in data["error"]["message"]
        assert call_api(root, "PUT", path, {**chat, "base": "yesterday"})[0] == 400
        assert call_api(root, "PUT", path, chat)[0] == 200  # no base: a plain save, as before
        call_api(root, "DELETE", path)
        code, data = call_api(root, "PUT", path, {**chat, "base": first[1]["updated"]})
        assert (code, data["error"]["code"]) == (409, "chat_deleted") and chats.list() == []
        code, data = call_api(root, "POST", "/v1/playground/chats", {**chat, "title": "x" * 201})
        assert code == 400 and "at most 200" in data["error"]["message"]


def test_a_rename_elsewhere_is_kept_and_renames_never_undo_a_save(tok, tmp_path):
    """The page's next save wrote back the title it had read over a rename made in another tab
    or the TUI; a rename racing a save wrote back the version it had read, and a reply the server
    had confirmed (200) was gone. A save without a title keeps the chat's; every read-compare-
    write holds the store's lock."""
    from concurrent.futures import ThreadPoolExecutor
    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        root = url.removesuffix("/v1")
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        made = call_api(root, "POST", "/v1/playground/chats", {**chat, "title": "T"})[1]
        path = f"/v1/playground/chats/{made['id']}"
        ConversationStore(tmp_path).rename(made["id"], "Renamed in the TUI")
        code, data = call_api(root, "PUT", path, {**chat, "base": made["updated"]})
        assert (code, data["title"]) == (200, "Renamed in the TUI")
        assert chats.list()[0].title == "Renamed in the TUI"

        def save(n):
            body = {"messages": [{"role": "user", "content": f"turn {m}"} for m in range(n + 1)]}
            return call_api(root, "PUT", path, body)

        def rename(n):
            return call_api(root, "PATCH", path, {"title": f"title {n}"})

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda n: (save if n % 2 else rename)(n), range(40)))
        assert all(code == 200 for code, _ in results)
        saved = json.loads((chats.root / f"{made['id']}.json").read_text())
        last = max((results[n][1]["updated"], n) for n in range(1, 40, 2))
        assert (saved["updated"], len(saved["messages"])) == (last[0], last[1] + 1)  # the last save's turns


def test_a_chat_keeps_its_answer_schema(tok, tmp_path):
    """The page saved a chat's JSON Schema with it, but the server dropped it: a reopened chat
    had lost its schema, and its next answers were free text."""
    chats = ConversationStore(tmp_path)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}}
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        root = url.removesuffix("/v1")
        body = {"title": "T", "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
        made = call_api(root, "POST", "/v1/playground/chats", body)[1]
        code, data = call_api(root, "GET", f"/v1/playground/chats/{made['id']}")
        assert (code, data["response_format"]) == (200, fmt)
        code, data = call_api(root, "POST", "/v1/playground/chats", {**body, "response_format": {"type": "xml"}})
        assert code == 400 and "response_format must be" in data["error"]["message"]


def test_two_tabs_on_one_chat_lose_nothing(browser, tok, tmp_path, shots):
    """Tab A and tab B open one chat and each sends: B's conversation is saved as a new chat,
    and B is told so; A's turns stay in the first. A reload reopens the chat it showed."""
    chats = ConversationStore(tmp_path)
    model = ScriptedModel([answer(tok, "Hm.", f"Reply {n}.") for n in range(1, 5)])
    with serving(model, tok, chats=chats) as url:
        page = Page(browser, url)
        page.find("#settings-toggle").click()
        page.find("#instructions").send_keys("Answer in French.")
        page.send("First")
        page.wait_reply(1)
        page.find("#instructions").clear()
        page.find("#instructions").send_keys("Now in German.")  # for A's next reply only
        [entry] = chats.list()
        assert page.js("return location.hash") == f"#chat={entry.id}"
        browser.execute_script("window.open('about:blank', '_blank')")
        a, b = browser.window_handles[0], browser.window_handles[-1]
        browser.switch_to.window(b)
        other = Page(browser, url, path=f"/#chat={entry.id}")  # the address a reload keeps: the chat reopens
        other.until(lambda: "Reply 1." in other.text(), "the chat was not reopened after a reload")
        browser.switch_to.window(a)
        page.send("From tab A")
        page.wait_reply(2)
        browser.switch_to.window(b)
        other.send("From tab B")
        other.wait_reply(1)
        other.until(lambda: not other.find("#alert").get_attribute("hidden"), "B was not told")
        assert "changed elsewhere" in other.find("#alert").text and "saved as a new chat" in other.find("#alert").text
        shots(browser, "two-tabs-conflict")
        browser.close()
        browser.switch_to.window(a)
        saved = {e.title: json.loads((chats.root / f"{e.id}.json").read_text()) for e in chats.list()}
        assert set(saved) == {"First", "First (copy)"}
        users = {title: [m["content"] for m in data["messages"] if m["role"] == "user"] for title, data in saved.items()}
        assert users == {"First": ["First", "From tab A"], "First (copy)": ["First", "From tab B"]}
        assert saved["First"]["messages"][0] == {"role": "system", "content": "Now in German."}
        assert saved["First (copy)"]["messages"][0] == {"role": "system", "content": "Answer in French."}


def test_back_and_an_edited_address_open_the_chat_they_name(browser, tok, tmp_path):
    """After opening A, then B, Back changed the address to A while the page still showed B: a
    reload then opened another chat than the one on screen, and a message sent went to B."""
    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        root = url.removesuffix("/v1")
        a, b = (call_api(root, "POST", "/v1/playground/chats",
                         {"title": name, "messages": [{"role": "user", "content": f"{name} says hi"}]})[1]["id"]
                for name in ("Chat A", "Chat B"))
        page = Page(browser, url, path=f"/#chat={a}")
        page.until(lambda: "Chat A says hi" in page.text(), "A was not opened")
        page.find(f'#chats li[data-id="{b}"] button.open').click()
        page.until(lambda: "Chat B says hi" in page.text(), "B was not opened")
        browser.back()
        page.until(lambda: "Chat A says hi" in page.text(), "Back did not open A")
        assert page.js("return location.hash") == f"#chat={a}"
        browser.forward()
        page.until(lambda: "Chat B says hi" in page.text(), "Forward did not open B")
        page.js("location.hash = 'chat=no-such-chat'")
        page.until(lambda: "no saved chat 'no-such-chat'" in page.text("#alert"), "the missing chat was not said")
        assert page.js("return location.hash") == f"#chat={b}" and "Chat B says hi" in page.text()


def test_a_chat_is_saved_with_the_instructions_its_reply_was_made_with(browser, tok, tmp_path):
    """Instructions edited while a reply streamed were saved as the ones it was made with."""
    chats = ConversationStore(tmp_path)
    with serving(SlowScriptedModel([answer(tok, "Hm.", "word " * 40)]), tok, chats=chats) as url:
        page = Page(browser, url)
        page.find("#settings-toggle").click()
        page.find("#instructions").send_keys("Answer in French.")
        page.send("Hello")
        page.until(lambda: "word" in page.text(), "nothing streamed")
        page.find("#instructions").clear()
        page.find("#instructions").send_keys("Answer in German.")
        page.wait_reply(1)
        [entry] = chats.list()
        saved = json.loads((chats.root / f"{entry.id}.json").read_text())
        assert saved["messages"][0] == {"role": "system", "content": "Answer in French."}


SLOW_SAVES = """
const fetched = window.fetch;
window.fetch = async (url, options = {}) => {  // a slow disk or link: each save takes a second
  if (String(url).includes("/v1/playground/chats") && ["PUT", "POST"].includes(options.method)) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  return fetched(url, options);
};"""


def test_a_save_still_under_way_ends_on_the_chat_it_was_made_for(browser, tok, tmp_path):
    """A tester's: New chat (or another chat opened) while a reply's save was under way took
    that chat's id, and the next message sent there was saved over it (its turns gone without a
    word). Two replies in one chat, saved slowly, make one chat, not a copy."""
    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "Noted.")]), tok, chats=chats) as url:
        page = Page(browser, url)
        page.js(SLOW_SAVES)
        page.send("first question")
        page.wait_reply(1)
        page.send("second question")  # while the first reply's save is under way
        page.wait_reply(2)
        page.find("#new-chat").click()  # while the second reply's save is under way
        page.send("another chat")
        page.wait_reply(1)
        def users():
            return sorted([m["content"] for m in json.loads((chats.root / f"{e.id}.json").read_text())["messages"]
                           if m["role"] == "user"] for e in chats.list())

        page.until(lambda: len(users()) == 2 and len(sum(users(), [])) == 3, "not saved")
        time.sleep(1.5)  # any save still under way lands
        assert users() == [["another chat"], ["first question", "second question"]], users()
        assert page.text().count("another chat") == 1 and "first question" not in page.text()
        page.b.refresh()  # the address names the chat on screen
        page.wait_ready()
        page.until(lambda: "another chat" in page.text(), "the reload opened another chat")
        assert page.errors() == []


@pytest.mark.parametrize("then", ["reopen", "delete"])
def test_a_chat_reopened_or_deleted_while_its_save_is_under_way_waits_for_it(browser, tok, tmp_path, then):
    """A re-attack's: reopened from the list before its save landed, the chat showed without its
    last turn, and the next message forked it into a copy (blaming "another tab"); deleted then,
    it came back as a copy."""
    chats = ConversationStore(tmp_path)
    with serving(ScriptedModel([answer(tok, "Hm.", "Noted.")]), tok, chats=chats) as url:
        page = Page(browser, url)
        page.send("first")
        page.wait_reply(1)
        page.until(lambda: len(page.all("#chats li")) == 1, "not listed")
        page.js(SLOW_SAVES)
        page.send("second")
        page.wait_reply(2)  # its save (a second long) is under way
        page.find("#new-chat").click()
        click = "const row = document.querySelector('#chats li'); row.querySelector(arguments[0]).click();"
        if then == "reopen":  # (in the page: the list is drawn again when New chat and the save end)
            page.js(click, ".open")
            page.until(lambda: "second" in page.text(), "reopened without its last turn")
            page.send("third")
            page.wait_reply(1)
            page.until(lambda: len(json.loads((chats.root / f"{chats.list()[0].id}.json").read_text())["messages"])
                       == 6, "the third turn was not saved")
            time.sleep(1.5)
            [entry] = chats.list()  # no copy
            users = [m["content"] for m in json.loads((chats.root / f"{entry.id}.json").read_text())["messages"]
                     if m["role"] == "user"]
            assert users == ["first", "second", "third"], users
        else:
            page.js(click + " row.querySelector(arguments[0]).click();", ".delete")  # the first click asks
            page.until(lambda: not chats.list() and not page.all("#chats li"), "not deleted")
            time.sleep(2.5)  # a save refused for the deleted chat, and its copy's (each a second)
            assert not chats.list()  # and not back as a copy
        assert page.find("#alert").text == ""


def test_the_page_asks_for_the_api_key_and_then_works(browser, tok, tmp_path):
    model = ScriptedModel([answer(tok, "Hm.", "Keyed reply.")])
    with serving(model, tok, chats=ConversationStore(tmp_path), api_key="sesame") as url:
        page = Page(browser, url, ready=False)
        page.js("sessionStorage.clear()")
        page.b.refresh()
        page.until(lambda: page.find("#key-form").is_displayed(), "the page did not ask for the key")
        page.find("#key").send_keys("open up\n")  # a wrong key was taken back without a word
        page.until(lambda: page.find("#key-error").text == "The server refused this key.", "not told")
        page.find("#key").clear()
        page.find("#key").send_keys("sesame\n")
        page.wait_ready()
        assert not page.find("#key-form").is_displayed()
        page.send("Hi")
        assert page.wait_reply(1).find_element("css selector", ".answer").text == "Keyed reply."
        page.js("sessionStorage.clear()")


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_server_tool_calls_are_mcp_call_items_and_read_back_as_input(tok):
    """What the page's tool rows are built from: a call the server ran, with its output, in the
    plain (not streamed) Responses API too; sent back as input it renders as call and result."""
    from test_server import client

    model = ScriptedModel([call(tok, "Use add.", "add", '{"a": 2, "b": 3}'), answer(tok, "It gave 5.", "5")])
    with serving(model, tok, tools=ServerTools(functions=[FunctionTool.from_callable(add)])) as url:
        r = client(url).responses.create(model="gpt-oss-tiny", input="2+3?")
        assert [o.type for o in r.output] == ["reasoning", "mcp_call", "reasoning", "message"]
        ran = r.output[1].model_dump()
        assert {k: ran[k] for k in ("name", "arguments", "output", "status", "server_label")} == {
            "name": "add", "arguments": '{"a": 2, "b": 3}', "output": "5", "status": "completed",
            "server_label": "gptoss-mlx"}
        again = client(url).responses.create(model="gpt-oss-tiny", input=[
            {"type": "message", "role": "user", "content": "2+3?"}, ran,
            {"type": "message", "role": "assistant", "content": "5"},
            {"type": "message", "role": "user", "content": "Again?"}])
        assert again.status == "completed"
        assert ("<|start|>assistant to=functions.add<|channel|>commentary <|constrain|>json<|message|>"
                "{\"a\": 2, \"b\": 3}<|call|>"
                "<|start|>functions.add to=assistant<|channel|>commentary<|message|>5<|end|>") in tok.decode(model.fed)


# ---- hostile text, fuzzed ---------------------------------------------------------------------

MARKDOWNISH = st.lists(st.sampled_from(list("*_`[]()<>#-|~!:/=\"' \n\tax1.") + [
    "https://", "javascript:", "<img src=x onerror=", "<script>", "```", "\n- ", "\n1. ", "\n> ", "|---|"]),
    max_size=40).map("".join)
SAFE_TAGS = {"P", "BR", "H3", "H4", "H5", "H6", "UL", "OL", "LI", "BLOCKQUOTE", "PRE", "CODE", "SPAN", "STRONG",
             "EM", "DEL", "A", "HR", "TABLE", "TR", "TH", "TD", "DIV"}
RENDER_ALL = """
const [texts, done] = arguments;
import('/playground/markdown.js').then(({renderMarkdown}) => done(texts.map((text) => {
  const box = document.createElement('div');
  try { box.append(renderMarkdown(text)); } catch (e) { return {error: String(e)}; }
  const nodes = [...box.querySelectorAll('*')];
  return {tags: nodes.map((n) => n.tagName),
          attributes: nodes.flatMap((n) => n.getAttributeNames()),
          hrefs: nodes.filter((n) => n.tagName === 'A').map((n) => n.getAttribute('href'))};
})));
"""


@pytest.fixture(scope="module")
def markdown_page(browser, tok, tmp_path_factory):
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok,
                 chats=ConversationStore(tmp_path_factory.mktemp("md"))) as url:
        yield Page(browser, url)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(MARKDOWNISH, min_size=20, max_size=20))
def test_markdown_of_any_text_builds_only_safe_elements(markdown_page, texts):
    for text, out in zip(texts, markdown_page.b.execute_async_script(RENDER_ALL, texts)):
        assert "error" not in out, (text, out)
        assert set(out["tags"]) <= SAFE_TAGS, (text, out)
        assert set(out["attributes"]) <= {"class", "href", "rel", "target", "start", "data-lang"}, (text, out)
        assert all(h.startswith(("http://", "https://")) for h in out["hrefs"]), (text, out)


def test_quotes_nested_thousands_deep_render_without_breaking_the_page(markdown_page):
    """A tester's (helper-143): a reply (or a saved chat) with '> ' nested 3,000-5,000 deep
    overflowed renderMarkdown's stack or crashed the tab, at each reload of that chat. Quotes
    nest 16 deep; the rest of the '>'s stay text."""
    deep = "> " * 5000 + "deep"
    (out,) = markdown_page.b.execute_async_script(RENDER_ALL, [deep])
    assert "error" not in out and out["tags"].count("BLOCKQUOTE") == 16, out.get("error")
    (out,) = markdown_page.b.execute_async_script(RENDER_ALL, ["> a\n> > b\n\nc"])
    assert out["tags"].count("BLOCKQUOTE") == 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["title", "messages", "reasoning_effort", "tools", "date", "x"]),
                            JSON_VALUES, max_size=4),
       messages=st.lists(MESSAGE, max_size=3))
def test_hostile_chat_bodies_are_4xx_and_never_reach_the_store(scripted_chats, body, messages):
    url, chats = scripted_chats
    for method, path in (("POST", "/v1/playground/chats"), ("PUT", "/v1/playground/chats/fuzzed")):
        code, data = call_api(url, method, path, {"messages": messages, **body})
        assert code < 500, data
        if code >= 400:
            assert set(data["error"]) == {"message", "type", "param", "code"}
    for entry in chats.list():  # whatever was accepted opens as a chat
        assert entry.messages >= 0, entry.problem


@pytest.fixture(scope="module")
def scripted_chats(tok, tmp_path_factory):
    chats = ConversationStore(tmp_path_factory.mktemp("fuzz"))
    with serving(ScriptedModel([answer(tok, "Hm.", "ok")]), tok, chats=chats) as url:
        yield url.removesuffix("/v1"), chats

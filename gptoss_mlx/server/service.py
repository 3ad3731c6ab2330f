"""What both APIs share: the loaded model, building the prompt, and generating one reply into
output items (gptoss_mlx/server/output.py), with its usage and one log line."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from .. import harmony
from ..chat import (
    REPLY_RESERVE, ToolCall, cut_result, first_fitting, fit_by_cutting, message_tokens, result_channel,
    trimmed_histories,
)
from ..generate import Engine, SamplingParams
from ..harmony import DeveloperContent, HarmonyError, Message
from ..harmony.chat_completions import FUNCTIONS
from ..structured import SchemaError, call_header, constrained_messages, constraints_for, final_header
from ..tools import Toolbox, ToolResult
from ..tools.toolbox import limit_reached, no_such_tool
from .errors import APIError, bad_request
from .output import CALL, SERVER_CALL, OutputEvent, ReplyStream, Waiting
from . import params
from .params import function_names
from .scheduler import Run, Scheduler, shutting_down
from .tools import FUNCTION_THREADS, MAX_ROUNDS, ServerTools

log = logging.getLogger("gptoss_mlx.server")

DISCONNECT_POLL_S = 0.2  # how often a reply that has no token yet checks that its client is there
WORKER_END_S = 5.0  # past a function's timeout, how long its worker process may take to end
WAITING_S = 10.0  # while a tool the server runs works, a stream hears of it this often
REQUIRED = "required"  # tool_choice: the reply calls one of the request's functions, the model picks which


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Reply:
    """One request's reply, as it is generated and after: one run, or one per round when the
    server answers tool calls itself."""
    id: str
    messages: list[Message]  # the conversation so far, in harmony
    runs: list[Run]
    stream: ReplyStream
    forced: list[int] = field(default_factory=list)  # a forced tool call's header tokens
    reasoning_budget: int | None = None
    finish_reason: str | None = None  # "stop", "length", "tool_calls"
    created: int = field(default_factory=lambda: int(time.time()))
    output_tokens: int = 0  # sampled tokens the reply took, up to a stop string (not the forced header)
    gone: bool = False  # the client went away before the reply was done
    deleted: bool = False  # DELETE /v1/responses/{id} came while it ran
    cut_short: bool = False  # a tool's result left no room for a reply, or no tokens were left
    recipients: list[str] = field(default_factory=list)  # the tools it may call, client's and server's
    server_tools: ServerTools | None = None  # those the server runs for it
    toolbox: Toolbox | None = None  # their instances, while the reply is made
    max_rounds: int = MAX_ROUNDS  # calls the server answers before the limit's (max_tool_calls)

    @property
    def run(self) -> Run:
        return self.runs[-1]

    @property
    def ended(self) -> bool:
        """No more of it is wanted: its client left, or it was deleted."""
        return self.gone or self.deleted

    def stop(self) -> None:
        """Stop the run under way at the engine's next step (also before its first token), and a
        tool of the server's that runs for it; no next round follows (``ended``)."""
        self.run.cancelled.set()
        if self.toolbox is not None:
            self.toolbox.cancel()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.runs)

    @property
    def cached_tokens(self) -> int:
        return sum(r.stats.reused_tokens for r in self.runs if r.stats)


@dataclass
class Service:
    model_name: str
    tokenizer: object
    engine: Engine
    scheduler: Scheduler
    sampling: SamplingParams = field(default_factory=SamplingParams)  # the server's defaults
    reasoning_effort: str = "medium"
    instructions: str | None = None  # for requests that bring none
    reasoning_budget: int | None = None  # for requests that bring none
    tools: ServerTools | None = None  # tools the server runs itself
    base_model: str | None = None  # under an adapter (model_name "BASE+ADAPTER"): the base's name, also accepted
    _function_slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def check_model(self, body: dict) -> None:
        model = params.typed(body, "model", str, "a string (the model's name)")  # (4 was a 404, helper-154)
        names = [name for name in (self.model_name, self.base_model) if name]
        if model is not None and model not in names + [name.rsplit("/", 1)[-1] for name in names]:
            raise APIError(404, f"the model {model!r} does not exist: this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def server_tools(self, request: dict) -> ServerTools | None:
        """The server's own tools for ``request``: none under tool_choice "none" or a list of
        allowed tools (which names functions of the request's)."""
        hidden = request.get("tool_choice") == "none" or request.get("server_tools") is False
        return self.tools if self.tools and not hidden else None

    def conversation(self, request: dict) -> list[Message]:
        """Harmony messages for a Chat Completions-shaped ``request`` (its tools, effort and
        messages), with the server's instructions and tools where it has them."""
        first = request["messages"][0] if request["messages"] else None
        if self.instructions is not None and not (isinstance(first, dict) and
                                                  first.get("role") in ("system", "developer")):
            request = {**request, "messages": [{"role": "system", "content": self.instructions},
                                               *request["messages"]]}
        tools = self.server_tools(request)
        if tools:
            clash = function_names(request.get("tools")) & {f.name for f in tools.functions}
            if clash:
                raise bad_request(f"the server runs its own function(s) named {', '.join(sorted(clash))}: "
                                  "rename the request's tool", "tools")
            request = {**request, "tools": [*(request.get("tools") or []), *tools.chat_tools()]}
        try:
            messages = harmony.from_chat_completions(request, date=harmony.today())
        except HarmonyError as e:
            field = next((f for f in ("tools", "response_format") if str(e).startswith(f)), "messages")
            raise bad_request(str(e), field) from None
        if tools:
            messages[0] = tools.system_message(request["reasoning_effort"], harmony.today())
        return messages

    def rendered(self, messages: list[Message]) -> list[int]:
        """The prompt's tokens for ``messages``; a 400 when they cannot be rendered."""
        try:
            return harmony.segments_to_tokens(harmony.render_conversation(messages), self.tokenizer)
        except HarmonyError as e:
            raise bad_request(str(e)) from None

    def tokens(self, messages: list[Message], forced: list[int] = (), rendered: list[int] | None = None) -> list[int]:
        """The prompt for ``messages`` (``rendered``: their tokens, when already made), then the
        ``forced`` header; context_length_exceeded when it leaves no room for a reply."""
        tokens = self.rendered(messages) if rendered is None else rendered
        if len(tokens) + len(forced) >= self.max_context:
            # (a 1 MB schema's description in a one-line request was "shorten the conversation")
            head = list(itertools.takewhile(lambda m: m.role in ("system", "developer"), messages))
            setup = len(self.rendered(head)) if head else 0
            what, shorten = (f" ({setup} of them the instructions, tools and response format)",
                             "shorten them") if setup > len(tokens) // 2 else ("", "shorten the conversation")
            raise APIError(400, f"the prompt is {len(tokens)} tokens{what} and this server's context limit "
                           f"is {self.max_context} tokens (--max-context): {shorten}",
                           param="messages", code="context_length_exceeded")
        return tokens + list(forced)

    def room(self, params: SamplingParams) -> int:
        """The prompt tokens that leave room for a reply, as the terminal chat keeps it:
        REPLY_RESERVE, or max_tokens when smaller, at most a quarter of the context."""
        return self.max_context - min(REPLY_RESERVE, params.max_tokens or REPLY_RESERVE, self.max_context // 4)

    def fitted(self, messages: list[Message], params: SamplingParams,
               forced: list[int] = ()) -> tuple[list[Message], list[int]]:
        """``messages`` with as few of the oldest turns left out as leaves room for the reply
        (:meth:`room`), and their tokens: the Responses API's ``truncation: "auto"``. The
        instructions at the start and the last user message always stay, the latest developer
        message among the turns left out while it can; so do the last calls and their results when the input
        ends with them, the results cut to fit if need be (when they alone do not fit:
        context_length_exceeded, from tokens()). Turns are left out
        as the terminal chat leaves them out (:func:`trimmed_histories`), so that a conversation
        that goes on keeps its start, and its prompt cache, for a while."""
        room = self.room(params) - len(forced)
        head = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
        rests = trimmed_histories(messages[head:], lambda m: message_tokens(m, self.tokenizer), room // 4)
        candidates = [messages] + [messages[:head] + rest for rest in rests]
        index, tokens = first_fitting(candidates, self.rendered, room)
        if index == len(candidates) and messages[-1].role == "tool":
            cut = fit_by_cutting(candidates, self.tokenizer, self.rendered, room)
            if cut is not None:
                return cut[0], cut[1]
        return candidates[min(index, len(candidates) - 1)], tokens

    async def new_reply(self, prefix: str, request: dict, forced_function: str | None,
                        params: SamplingParams, stops: list[str]) -> Reply:
        """A reply to a Chat Completions-shaped ``request``. A named function call is written
        into the prompt as the reply's header; REQUIRED leaves the reasoning free and the choice
        of the function to the model, within the constraint. Rendered and tokenized in a worker
        thread: a long conversation takes seconds (the tokenizer lets go of the GIL), during
        which the event loop goes on serving the other requests."""
        return await asyncio.to_thread(self._new_reply, prefix, request, forced_function, params, stops)

    def _new_reply(self, prefix: str, request: dict, forced_function: str | None,
                   params: SamplingParams, stops: list[str]) -> Reply:
        messages = self.conversation(request)
        forced, must_call = [], ()
        if forced_function == REQUIRED:
            must_call = tuple(sorted(function_names(request.get("tools"))))  # the client's, not the server's
        elif forced_function:
            forced = call_header(self.tokenizer, forced_function)
        rendered = None
        if request.get("truncation") == "auto":
            messages, rendered = self.fitted(messages, params, forced)
        prompt = self.tokens(messages, forced, rendered)
        budget = request.get("reasoning_budget", self.reasoning_budget)
        run = Run(prompt, params, self.constraints(messages, prompt, params, budget, forced, must_call),
                  instructions=harmony.instructions_length(messages, prompt))
        stream = ReplyStream(self.tokenizer, stops, constrained=constrained_messages(run.logits_processors))
        stream.final_only = any(isinstance(m.content, DeveloperContent) and m.content.response_formats
                                for m in messages)
        # The client gets the calls to its own functions; the server answers every other call:
        # its own tools run, anything else (an undeclared function, any call under tool_choice
        # "none") gets an error the model can answer on from.
        client = [FUNCTIONS + name for name in sorted(function_names(request.get("tools")))]
        stream.server_answers = lambda recipient: recipient not in client
        tools = self.server_tools(request)
        max_tool_calls = request.get("max_tool_calls")
        return Reply(new_id(prefix), messages, [run], stream, forced, budget,
                     recipients=client + (tools.recipients() if tools else []), server_tools=tools,
                     max_rounds=MAX_ROUNDS if max_tool_calls is None else min(MAX_ROUNDS, max_tool_calls))

    def constraints(self, messages: list[Message], prompt: list[int], params: SamplingParams,
                    budget: int | None, forced: list[int] = (), must_call: tuple[str, ...] = ()) -> list:
        """The structured-output constraint of a run (gptoss_mlx/structured.py): the response
        format, valid function calls, a call to one of ``must_call``, the reasoning budget; a 400
        naming a schema it cannot enforce."""
        try:
            # a client's answer is never closed early: cut, it is cut (invalid JSON, incomplete),
            # as OpenAI's is; a shorter valid one parsed as whole (responses.parse, LangChain)
            return constraints_for(self.tokenizer, messages, reasoning_budget=budget, prefix=forced,
                                   max_tokens=self.engine.token_budget(len(prompt), params),
                                   must_call=must_call, close_early=False)
        except SchemaError as e:
            raise bad_request(str(e), "response_format" if str(e).startswith("response format")
                              else "tools") from None

    async def generate(self, reply: Reply, request) -> AsyncIterator[OutputEvent]:
        """The reply's output events. Stops at a stop string or when the client has gone (a
        watcher polls for that while the reply is made, prefill included). A call to one of the
        server's own tools is answered and the generation goes on."""
        watcher = asyncio.create_task(self._watch(reply, request))
        try:
            async for event in self._generate(reply, request):
                yield event
        except (GeneratorExit, asyncio.CancelledError):  # a stream's client went away
            reply.gone = True
            self.log(reply, request)
            raise
        finally:
            watcher.cancel()
        self.log(reply, request)

    async def _watch(self, reply: Reply, request) -> None:
        """When the client goes away, the run in progress stops at the engine's next step, also
        before the reply's first token (while it waits, or its prompt is prefilled) and when no
        token is sent to it (a non-streaming client waits for the whole reply); a tool of the
        server's that runs for it is stopped."""
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        reply.gone = True
        reply.stop()

    async def _generate(self, reply: Reply, request) -> AsyncIterator[OutputEvent]:
        """Rounds of generation: after a call the server answers, its result goes into the
        conversation and the model goes on. After ``reply.max_rounds`` answered calls (MAX_ROUNDS,
        or the request's max_tool_calls) one more call is told the limit is reached, and the last
        round is the answer (its header is forced)."""
        stream, forced = reply.stream, reply.forced
        reply.toolbox = reply.server_tools.toolbox() if reply.server_tools else None
        try:
            limit = reply.max_rounds
            for round_ in range(limit + 2):
                for token in forced:
                    for event in stream.feed(token):
                        yield event
                async with contextlib.aclosing(self.scheduler.generate(reply.run)) as tokens:
                    async for token in tokens:
                        reply.output_tokens += 1  # not those the engine made past a stop string
                        for event in stream.feed(token):
                            yield event
                        if stream.stopped or reply.ended:  # gone: seen by _watch; deleted: a DELETE
                            break
                for event in stream.finish():
                    yield event
                call = stream.items[-1] if stream.items else None
                if (reply.ended or call is None or call.kind != SERVER_CALL or round_ > limit
                        or reply.run.stats is None or reply.run.stats.finish_reason != "stop"):
                    break
                async with contextlib.aclosing(self.answering(reply, call, round_ == limit)) as answering:
                    async for event in answering:
                        if isinstance(event, Waiting):
                            yield event
                        result = event
                if reply.ended:  # it left, or was deleted, while the tool ran (which was stopped)
                    break
                forced = final_header(self.tokenizer) if round_ == limit else []
                run = await asyncio.to_thread(self.next_run, reply, call, result, forced)
                if run is None:
                    break
                reply.runs.append(run)
                stream.next_round()
        finally:
            toolbox, reply.toolbox = reply.toolbox, None
            if toolbox is not None:
                toolbox.cancel()  # at once, also when this generator is being closed
                try:
                    await asyncio.to_thread(toolbox.close)
                except RuntimeError:  # the server is shutting down: no worker threads left
                    toolbox.close()
        stats = reply.run.stats
        if stream.stopped:
            reply.finish_reason = "stop"
        elif reply.cut_short or stats is not None and stats.finish_reason in ("length", "context"):
            reply.finish_reason = "length"
        elif stream.items and stream.items[-1].kind == CALL:
            reply.finish_reason = "tool_calls"
        else:
            reply.finish_reason = "stop"

    async def answering(self, reply: Reply, call, limit: bool) -> AsyncIterator[Waiting | ToolResult]:
        """The call's result (:meth:`answer`) as the last event; before it, every WAITING_S
        while it is made, a Waiting event."""
        answering = asyncio.ensure_future(self.answer(reply, call, limit))
        closed = asyncio.ensure_future(self.scheduler.closed.wait())
        try:
            while not (await asyncio.wait({answering, closed}, timeout=WAITING_S,
                                          return_when=asyncio.FIRST_COMPLETED))[0]:
                yield Waiting(call)
            if not answering.done():  # the server is shutting down: the reply fails with a 503
                if reply.toolbox is not None:
                    reply.toolbox.cancel()
                raise shutting_down()
        finally:
            answering.cancel()  # only if the stream is closed meanwhile, or the server
            closed.cancel()
        yield answering.result()

    def next_run(self, reply: Reply, call, result: ToolResult, forced: list[int]) -> Run | None:
        """The round after a call's result, its prompt ending in ``forced``; None, the reply cut
        short, when its max_tokens are spent (the result stays unread) or not even a note of
        the result leaves room for a reply. The call keeps its result, as the model reads it."""
        call.result, call.failed = result.content, not result.ok
        params = self.params_left(reply)
        fitted = params and self.with_result(reply.messages + reply.stream.messages, result,
                                             result_channel(call), params, forced)
        if not fitted:
            reply.cut_short = True
            return None
        reply.messages, prompt = fitted
        call.result = reply.messages[-1].text
        return Run(prompt, params, self.constraints(reply.messages, prompt, params, reply.reasoning_budget, forced))

    async def answer(self, reply: Reply, call, limit: bool) -> ToolResult:
        """The result of a call the server answers: its tool's (run in a worker thread), the
        limit's error, or the error of a call to a tool the reply does not have."""
        if limit:
            return ToolResult(call.recipient, limit_reached(reply.max_rounds), ok=False)
        if reply.toolbox is not None and reply.server_tools.handles(call.recipient):
            tool_call = ToolCall(call.recipient, call.text, call.channel)
            if call.recipient.startswith(FUNCTIONS):
                return await self.run_function(reply.toolbox, tool_call, reply.server_tools)
            return await asyncio.to_thread(reply.toolbox.execute, tool_call)  # bounded by its own limits
        return ToolResult(call.recipient, f"Error: {no_such_tool(call.recipient, reply.recipients)}", ok=False)

    async def run_function(self, toolbox: Toolbox, call: ToolCall, tools: ServerTools) -> ToolResult:
        """A call to one of --functions, from a thread of its own (at most FUNCTION_THREADS at
        once): a function that never returns holds that thread, not one the server's own work
        needs, nor the server's exit. A function from a file runs in a worker process
        (tools/function_worker.py), which is ended when it has not returned within the timeout;
        a callable runs in the thread itself, which cannot be stopped (it is left). Not started
        or not returned in time: an error the model reads, and the reply goes on."""
        timeout_s = tools.function_timeout_s
        in_worker = tools.in_worker(call.recipient)
        if self._function_slots is None:
            self._function_slots = asyncio.Semaphore(FUNCTION_THREADS)
        slots, loop, start = self._function_slots, asyncio.get_running_loop(), time.monotonic()
        try:
            await asyncio.wait_for(slots.acquire(), timeout_s)
        except asyncio.TimeoutError:
            return ToolResult(call.recipient, f"Error: {call.recipient} did not start within {timeout_s:g} s: "
                              f"the server's {FUNCTION_THREADS} function threads are all busy", ok=False)
        result = loop.create_future()

        def done(outcome: ToolResult) -> None:  # on the event loop
            slots.release()
            if not result.done():
                result.set_result(outcome)

        def work() -> None:
            try:
                outcome = (tools.workers.call(call.recipient, call.arguments, timeout_s, since=start)
                           if in_worker else toolbox.execute(call))
            except KeyboardInterrupt:  # only raised by the function itself: the main thread gets Ctrl-C
                outcome = ToolResult(call.recipient, "Error: the tool failed (KeyboardInterrupt)", ok=False)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(done, outcome)
        threading.Thread(target=work, name=f"server-{call.recipient}", daemon=True).start()
        left = max(timeout_s - (time.monotonic() - start), 0) + (WORKER_END_S if in_worker else 0)
        try:
            return await asyncio.wait_for(asyncio.shield(result), left)
        except asyncio.TimeoutError:
            log.warning("%s has not returned after %g s (--function-timeout): the model is told it "
                        "failed; its thread is left running", call.recipient, timeout_s)
            return ToolResult(call.recipient, f"Error: {call.recipient} did not return within {timeout_s:g} s",
                              ok=False)

    @staticmethod
    def params_left(reply: Reply) -> SamplingParams | None:
        """The next round's sampling: max_tokens bounds the whole reply, not each round (None
        when the rounds so far spent it)."""
        params, limit = reply.run.params, reply.runs[0].params.max_tokens
        if limit is None:
            return params
        left = limit - reply.output_tokens
        return replace(params, max_tokens=left) if left > 0 else None

    def with_result(self, messages: list[Message], result: ToolResult, channel: str | None,
                    params: SamplingParams, forced: list[int]) -> tuple[list[Message], list[int]] | None:
        """The conversation with a tool's result, and its prompt (then ``forced``). The result
        is cut, with a note, where it would leave a reply less room than :meth:`room` (or, in a
        conversation already past that, less than the first round has: one token); whole where
        it fits. None when not even the note fits."""
        def conversation(text: str) -> list[Message]:
            return messages + [Message("tool", text, channel=channel or "commentary",
                                       recipient="assistant", name=result.name)]

        def prompt(text: str) -> list[int]:
            return self.rendered(conversation(text))
        room, limit = self.room(params) - len(forced), self.max_context - 1 - len(forced)
        tokens = prompt(result.content)
        if len(tokens) > room:
            cut = cut_result(result.content, self.tokenizer, prompt, room)
            if cut is None and len(tokens) > limit:  # already past the room: one token for the reply
                cut = cut_result(result.content, self.tokenizer, prompt, limit)
            if cut is None and len(tokens) > limit:
                return None
            if cut is not None:
                return conversation(cut[0]), cut[1] + list(forced)
        return conversation(result.content), tokens + list(forced)

    def log(self, reply: Reply, request) -> None:
        """One line per request: id, prompt / cached / generated tokens, TTFT, tok/s, batch, end."""
        first, last = reply.runs[0].stats, reply.run.stats
        if last is None or (reply.gone and not reply.output_tokens):  # left before its first token
            log.info("%s %s: %d prompt tokens, %d generated, %s", reply.id, request.url.path,
                     reply.prompt_tokens, reply.output_tokens,
                     "client disconnected" if reply.gone else "cancelled before generation")
            return
        end = ("deleted while it ran" if reply.deleted and not reply.gone
               else "client disconnected" if reply.gone or (last.finish_reason == "interrupted"
                                                           and not reply.stream.stopped)
               else f"finish {reply.finish_reason}")
        rounds = f", {len(reply.runs)} rounds (server tools)" if len(reply.runs) > 1 else ""
        log.info("%s %s: %d prompt tokens (%d cached), %d generated, TTFT %.3fs, %.1f tok/s, "
                 "batch %.1f, %s%s", reply.id, request.url.path, reply.prompt_tokens,
                 reply.cached_tokens, reply.output_tokens, first.ttft_s, last.decode_tps,
                 last.batch_size, end, rounds)

"""What both APIs share: the loaded model, building the prompt, and generating one reply into
output items (gptoss_mlx/server/output.py), with its usage and one log line."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from .. import harmony
from ..generate import Engine, SamplingParams
from ..harmony import CHANNEL, CONSTRAIN, MESSAGE, HarmonyError, Special
from .errors import APIError, bad_request
from .output import CALL, OutputEvent, ReplyStream
from .scheduler import Run, Scheduler

log = logging.getLogger("gptoss_mlx.server")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Reply:
    """One request's reply, as it is generated and after."""
    id: str
    run: Run
    stream: ReplyStream
    forced: list[int] = field(default_factory=list)  # a forced tool call's header tokens
    finish_reason: str | None = None  # "stop", "length", "tool_calls"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return len(self.run.prompt)

    @property
    def cached_tokens(self) -> int:
        return self.run.stats.reused_tokens if self.run.stats else 0

    @property
    def output_tokens(self) -> int:
        return len(self.forced) + (self.run.stats.generated_tokens if self.run.stats else 0)


@dataclass
class Service:
    model_name: str
    tokenizer: object
    engine: Engine
    scheduler: Scheduler
    sampling: SamplingParams = field(default_factory=SamplingParams)  # the server's defaults
    reasoning_effort: str = "medium"
    instructions: str | None = None  # for requests that bring none

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model not in (self.model_name, self.model_name.rsplit("/", 1)[-1]):
            raise APIError(404, f"the model {model!r} does not exist: this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def prompt(self, request: dict, forced_function: str | None) -> tuple[list[int], list[int]]:
        """(prompt tokens, forced header tokens) for a Chat Completions-shaped ``request``.
        A forced function call is written into the prompt as the reply's header."""
        first = request["messages"][0] if request["messages"] else None
        if self.instructions is not None and not (isinstance(first, dict) and
                                                  first.get("role") in ("system", "developer")):
            request = {**request, "messages": [{"role": "system", "content": self.instructions},
                                               *request["messages"]]}
        try:
            messages = harmony.from_chat_completions(request, date=harmony.today())
            tokens = harmony.segments_to_tokens(harmony.render_conversation(messages), self.tokenizer)
        except HarmonyError as e:
            raise bad_request(str(e)) from None
        forced = []
        if forced_function:
            header = [Special(CHANNEL), f"commentary to=functions.{forced_function} ",
                      Special(CONSTRAIN), "json", Special(MESSAGE)]
            forced = harmony.segments_to_tokens(header, self.tokenizer)
        if len(tokens) + len(forced) >= self.max_context:
            raise APIError(400, f"the prompt is {len(tokens)} tokens and this server's context limit "
                           f"is {self.max_context} tokens (--max-context): shorten the conversation",
                           param="messages", code="context_length_exceeded")
        return tokens + forced, forced

    def new_reply(self, prefix: str, prompt: list[int], forced: list[int], params: SamplingParams,
                  stops: list[str]) -> Reply:
        return Reply(new_id(prefix), Run(prompt, params), ReplyStream(self.tokenizer, stops), forced)

    async def generate(self, reply: Reply, request) -> AsyncIterator[OutputEvent]:
        """The reply's output events. Stops at a stop string or when the client has gone."""
        stream = reply.stream
        for token in reply.forced:
            for event in stream.feed(token):
                yield event
        async with contextlib.aclosing(self.scheduler.generate(reply.run)) as tokens:
            async for token in tokens:
                for event in stream.feed(token):
                    yield event
                if stream.stopped or await request.is_disconnected():
                    break
        for event in stream.finish():
            yield event
        stats = reply.run.stats
        if stream.stopped:
            reply.finish_reason = "stop"
        elif stats is not None and stats.finish_reason in ("length", "context"):
            reply.finish_reason = "length"
        elif stream.items and stream.items[-1].kind == CALL:
            reply.finish_reason = "tool_calls"
        else:
            reply.finish_reason = "stop"
        self.log(reply, request)

    def log(self, reply: Reply, request) -> None:
        stats = reply.run.stats
        if stats is None:  # never reached the engine (the client left while it waited)
            log.info("%s %s: cancelled before generation", reply.id, request.url.path)
            return
        end = ("client disconnected" if stats.finish_reason == "interrupted" and not reply.stream.stopped
               else f"finish {reply.finish_reason}")
        log.info("%s %s: %d prompt tokens (%d cached), %d generated, TTFT %.3fs, %.1f tok/s, %s",
                 reply.id, request.url.path, stats.prompt_tokens, stats.reused_tokens,
                 stats.generated_tokens, stats.ttft_s, stats.decode_tps, end)

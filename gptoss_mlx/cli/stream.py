"""Printing a reply as it streams, and answering one message (``generate``, piped ``chat``)."""

from __future__ import annotations

import sys

from ..chat import AnswerDelta, ContextTrimmed, Done, ReasoningDelta, ToolCall
from ..generate import ContextLengthError
from ..tools import ToolResult, run_with_tools
from . import common
from .common import DIM, RESET, CLIError, make_toolbox


def replies(chat, text, toolbox):
    """One user turn: with tools, the loop that answers tool calls until the model is done."""
    if toolbox is None:
        return chat.send(text)
    return run_with_tools(chat, text, toolbox)


def print_events(events, show_reasoning: bool, answer_out, reasoning_out, dim: bool) -> Done | None:
    """Print a reply's events; returns the Done event."""
    in_reasoning = False
    done = None

    def end_reasoning(gap: str) -> None:
        nonlocal in_reasoning
        if in_reasoning:
            reasoning_out.write((RESET if dim else "") + gap)
            reasoning_out.flush()
            in_reasoning = False

    for event in events:
        if isinstance(event, ReasoningDelta):
            if show_reasoning:
                if not in_reasoning and dim:
                    reasoning_out.write(DIM)
                in_reasoning = True
                reasoning_out.write(event.text)
                reasoning_out.flush()
        elif isinstance(event, AnswerDelta):
            end_reasoning("\n\n")
            answer_out.write(event.text)
            answer_out.flush()
        elif isinstance(event, ToolCall):
            end_reasoning("\n")
            reasoning_out.write(f"\n[tool call → {event.recipient}] {event.arguments.strip()}\n")
            reasoning_out.flush()
        elif isinstance(event, ToolResult):
            text = event.content if len(event.content) <= 2000 else event.content[:2000] + " …"
            reasoning_out.write(f"[result ← {event.name}] {text.strip()}\n\n")
            reasoning_out.flush()
        elif isinstance(event, ContextTrimmed):
            end_reasoning("\n")
            reasoning_out.write(f"[context full: dropped the {event.dropped_messages} oldest "
                                f"messages ({event.dropped_tokens} tokens) to make room]\n")
            reasoning_out.flush()
        elif isinstance(event, Done):
            done = event
    end_reasoning("")
    answer_out.write("\n")
    answer_out.flush()
    return done


def answer_once(args, text: str, approve, show_reasoning: bool, dim: bool) -> int:
    """Load, answer ``text`` (running tools if asked): the answer to stdout, the rest to stderr."""
    toolbox = make_toolbox(args, approve)
    chat = common.load_chat(args, toolbox=toolbox)
    try:
        print_events(replies(chat, text, toolbox), show_reasoning, sys.stdout, sys.stderr, dim)
    except ContextLengthError as e:
        raise CLIError(str(e)) from None
    finally:
        if toolbox:
            toolbox.close()
    return 0

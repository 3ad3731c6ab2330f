"""``gptoss-mlx generate``: answer one prompt and exit, for scripts."""

from __future__ import annotations

import json
import sys

from . import common
from .common import (
    CLIError, add_model_options, add_structured_options, ask_on_terminal, decline_when_piped,
)
from .stream import Outcome, answer_once, cut_json, say_cut

def register(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt and exit",
                       description="Answer one prompt: the answer on standard output; the "
                                   "reasoning and, at the end, generation statistics on "
                                   "standard error.")
    add_model_options(p, positional_model=False)  # a word alone reads as the prompt
    add_structured_options(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message; - reads standard input")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of streaming: answer, reasoning, tool "
                        "calls, usage, finish reason")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when the reply is cut off by --max-tokens or the context")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    if common.follow_rank0(args):  # another machine's share of the model; rank 0 does the I/O
        return 0
    prompt = args.prompt
    if prompt == "-":
        if sys.stdin is None:
            raise CLIError("-p -: standard input is closed")
        prompt = common.message_text(common.read_standard_input())
        if not prompt:
            raise CLIError("-p -: no prompt on standard input")
    elif not prompt.strip():  # as an empty standard input is (an empty -p was answered: a tester's)
        raise CLIError("-p: the prompt is empty")
    approve = ask_on_terminal if sys.stdin.isatty() else decline_when_piped
    with common.sigterm_as_ctrl_c():  # (`timeout 60 gptoss-mlx generate --json` printed nothing)
        outcome = answer_once(args, prompt, approve, show_reasoning=True, dim=sys.stderr.isatty(),
                              quiet=args.json)
    if args.json:
        print(json.dumps({"answer": outcome.answer, "reasoning": outcome.reasoning,
                          "tool_calls": outcome.tool_calls, "usage": outcome.usage(),
                          "finish_reason": outcome.finish_reason}, ensure_ascii=False))
    if outcome.finish_reason == "interrupted":  # Ctrl-C or SIGTERM: what was made, the mark, 130 or 143
        if not args.json and outcome.answer and not outcome.answer.endswith("\n"):
            print()  # the answer's line ends on standard output
        print("[stopped]", file=sys.stderr)
        return outcome.stop_status
    print_stats(outcome)
    if say_cut(outcome.finish_reason):
        if args.json_schema or args.json_object:
            print(f"gptoss-mlx: {cut_json(outcome.done)}; raise --max-tokens", file=sys.stderr)
            return 1
        return 1 if args.strict else 0
    return 0


def print_stats(outcome: Outcome) -> None:
    """The statistics as ``mlx_lm.generate`` prints them, to standard error."""
    prefilled = sum(s.prompt_tokens - s.reused_tokens for s in outcome.stats)
    prefill_s = sum(s.prefill_s for s in outcome.stats)
    generated = sum(s.generated_tokens for s in outcome.stats)
    timed = sum(max(s.generated_tokens - 1, 0) for s in outcome.stats)  # the first is in the TTFT
    decode_s = sum(s.decode_s for s in outcome.stats)
    peak = max((s.peak_memory_gb for s in outcome.stats), default=0.0)
    print("=" * 10, file=sys.stderr)
    print(f"Prompt: {prefilled} tokens, {prefilled / prefill_s if prefill_s else 0:.3f} "
          "tokens-per-sec", file=sys.stderr)
    print(f"Generation: {generated} tokens, {timed / decode_s if decode_s else 0:.3f} "
          "tokens-per-sec", file=sys.stderr)
    print(f"Peak memory: {peak:.3f} GB", file=sys.stderr)

"""Fuzz the streaming parser with harmony-shaped token sequences and count what goes wrong.

    python tests/fuzz_harmony.py [-n 20000] [--parser path/to/harmony.py]

Prints: sequences / exceptions / sequences that lost text / sequences that invented text.
``--parser`` loads another implementation of ``StreamParser`` (e.g. an older harmony.py) to
compare against the same sequences.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings

from conftest import TOKENIZER_JSON  # run as a script: its folder, tests/, is on sys.path
from harmony_shapes import account, harmony_sequences

from gptoss_mlx.tokenizer import load_tokenizer


def load_parser(path: str | None):
    if path is None:
        from gptoss_mlx.harmony import StreamParser
        return StreamParser
    spec = importlib.util.spec_from_file_location("harmony_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.StreamParser


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--parser", default=None, help="a harmony.py defining StreamParser")
    ap.add_argument("--seed", type=int, default=0, help="which sequences (CI's property test has its own)")
    args = ap.parse_args()
    tok = load_tokenizer(TOKENIZER_JSON)
    StreamParser = load_parser(args.parser)
    counts, errors, examples = Counter(), Counter(), {}

    @seed(args.seed)
    @settings(max_examples=args.n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(harmony_sequences(tok))
    def run(case):
        tokens, role = case
        counts["sequences"] += 1
        parser = StreamParser(tok, role)
        try:
            for t in tokens:
                parser.feed(t)
            parser.finish()
        except Exception as e:  # noqa: BLE001 - counting them is the point
            counts["exceptions"] += 1
            errors[f"{type(e).__name__}: {str(e)[:60]}"] += 1
            examples.setdefault("exception", tok.decode(tokens))
            return
        lost, invented = account(tok, tokens, parser.messages)
        if lost:
            counts["lost text"] += 1
            examples.setdefault("lost", (tok.decode(tokens), lost))
        if invented:
            counts["invented text"] += 1
            examples.setdefault("invented", (tok.decode(tokens), invented))

    run()
    print(" / ".join(f"{k}: {counts[k]}" for k in ("sequences", "exceptions", "lost text", "invented text")))
    for e, n in errors.most_common(5):
        print(f"  {n:6d} x {e}")
    for kind, ex in examples.items():
        print(f"  first {kind}: {ex!r}"[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())

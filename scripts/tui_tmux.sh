#!/usr/bin/env bash
# Drive the real `gptoss-mlx tui` in tmux as a person would: a three-turn chat with the same
# effort (each reply runs on a new worker thread: issue 15), then Ctrl+Q, capturing the screen
# after each step (send-keys / capture-pane).
#
#   bash scripts/tui_tmux.sh [MODEL_DIR] [OUT_DIR]
#
# MODEL_DIR defaults to a tiny random checkpoint written with the real tokenizer from
# ../shared/data (its replies are random tokens: this checks the program, not the model).
# Captures land in OUT_DIR (default /tmp/gptoss-tui-captures): 1-loaded.txt, 2-reply-1.txt,
# 3-reply-2.txt, 4-reply-3.txt, 5-quit.txt. Exits 1 if a step does not show what it should.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-}
OUT=${2:-/tmp/gptoss-tui-captures}
SESSION=gptoss-tui-$$
mkdir -p "$OUT"
if [ -z "$MODEL" ]; then
  MODEL=$(mktemp -d)/tiny
  python3 -m gptoss_mlx.testing.checkpoints "$MODEL" --tokenizer ../shared/data/gpt-oss-tokenizer.json.gz >/dev/null
fi
export GPTOSS_MLX_DATA_DIR=$(mktemp -d)  # saved chats go here, not into the user's data dir

tmux new-session -d -s "$SESSION" -x 110 -y 60 \
  "gptoss-mlx tui --model '$MODEL' --max-tokens 12 --temperature 0 --no-memory-check; echo \"gptoss-mlx exited with status \$?\"; sleep 30"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true' EXIT

screen() { tmux capture-pane -p -t "$SESSION"; }
wait_for() {  # wait_for TEXT SECONDS [COUNT]: poll the screen until TEXT appears COUNT times
  for _ in $(seq 1 $(( $2 * 5 ))); do
    [ "$(screen | grep -cF -- "$1")" -ge "${3:-1}" ] && return 0
    sleep 0.2
  done
  echo "timed out waiting for: $1" >&2
  screen >&2
  return 1
}
capture() { screen > "$OUT/$1"; echo "== $1"; cat "$OUT/$1"; }
no_failure() {
  if grep -q "The reply failed" "$OUT/$1"; then echo "a reply failed (see $1)" >&2; exit 1; fi
}

wait_for "effort medium · context " 120  # (the status bar: the model has loaded)
capture 1-loaded.txt

n=0
for message in "Hello! What can you do?" "Tell me more, please." "And one more thing."; do
  n=$((n + 1))
  tmux send-keys -t "$SESSION" "$message" Enter
  wait_for "tok/s · TTFT" 120 "$n"  # this reply's stats line, below the earlier ones
  sleep 0.5
  capture "$((n + 1))-reply-$n.txt"
  no_failure "$((n + 1))-reply-$n.txt"
  grep -q "effort medium" "$OUT/$((n + 1))-reply-$n.txt"  # the same effort for every turn
done
ls "$GPTOSS_MLX_DATA_DIR"/chats/*.json >/dev/null  # the chat was saved

tmux send-keys -t "$SESSION" C-q
wait_for "gptoss-mlx exited with status" 30
capture 5-quit.txt
grep -q "exited with status 0" "$OUT/5-quit.txt" || { echo "the TUI did not exit cleanly" >&2; exit 1; }
echo "captures in $OUT"

#!/usr/bin/env bash
# Drive the real `gptoss-mlx tui` in tmux as a person would: a two-turn chat with an effort
# change, capturing the screen after each step (send-keys / capture-pane).
#
#   bash scripts/tui_tmux.sh [MODEL_DIR] [OUT_DIR]
#
# MODEL_DIR defaults to a tiny random checkpoint written with the real tokenizer from
# ../shared/data (its replies are random tokens: this checks the program, not the model).
# Captures land in OUT_DIR (default /tmp/gptoss-tui-captures): 1-loaded.txt, 2-first-reply.txt,
# 3-effort-high.txt, 4-second-reply.txt. Exits 1 if a step does not show what it should.
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

tmux new-session -d -s "$SESSION" -x 110 -y 34 \
  "gptoss-mlx tui --model '$MODEL' --max-tokens 40 --temperature 0 --no-memory-check; sleep 30"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true' EXIT

wait_for() {  # wait_for TEXT SECONDS: poll the screen until TEXT appears
  for _ in $(seq 1 $(( $2 * 5 ))); do
    if tmux capture-pane -p -t "$SESSION" | grep -qF -- "$1"; then return 0; fi
    sleep 0.2
  done
  echo "timed out waiting for: $1" >&2
  tmux capture-pane -p -t "$SESSION" >&2
  return 1
}
capture() { tmux capture-pane -p -t "$SESSION" > "$OUT/$1"; echo "== $1"; cat "$OUT/$1"; }

wait_for "context 0/" 120
capture 1-loaded.txt

tmux send-keys -t "$SESSION" "Hello! What can you do?" Enter
wait_for "tok/s · TTFT" 120
capture 2-first-reply.txt

tmux send-keys -t "$SESSION" C-t
wait_for "effort high" 10
capture 3-effort-high.txt

tmux send-keys -t "$SESSION" "Think harder, please." Enter
sleep 1
wait_for "effort high" 10
for _ in $(seq 1 300); do  # until the second reply's stats line appears
  [ "$(tmux capture-pane -p -t "$SESSION" | grep -c 'tok/s · TTFT')" -ge 2 ] && break
  sleep 0.2
done
capture 4-second-reply.txt
[ "$(grep -c 'tok/s · TTFT' "$OUT/4-second-reply.txt")" -ge 2 ] || { echo "second reply missing" >&2; exit 1; }
ls "$GPTOSS_MLX_DATA_DIR"/chats/*.json >/dev/null  # the chat was saved
tmux send-keys -t "$SESSION" C-q
echo "captures in $OUT"

"""LoRA fine-tuning on harmony conversations (``gptoss-mlx finetune``): the data and the loop.

Data: JSONL, one conversation per line in the Chat Completions shape saved chats have
(``messages``, optional ``tools``, ``reasoning_effort``, ``date``). An assistant message's
``reasoning`` (or ``thinking``, as in OpenAI's Multilingual-Thinking set) is its analysis; tool
calls and tool results are rendered as harmony does.

Each conversation is rendered exactly as at inference (:func:`render_for_training`): the turns
before the last user message lose their reasoning, as a chat's history does; the last turn (the
one trained) keeps it, and its final answer ends with ``<|return|>`` as sampled. The loss covers
the tokens the model samples at inference: every assistant message of the trained turn, except
the ``<|start|>assistant`` that the prompt itself ends with (at the turn's start and after each
tool result).

Training runs MLX's own operations (the custom kernels have no gradients), evaluates each step
whole, and can stop between steps and resume exactly: the data order is a function of the seed
and the step, and the optimizer's state is saved beside the adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import SafetensorError, safe_open

from . import harmony
from .files import JSONProblem, expand_user, parse_json, read_json_file
from .harmony import BUILTIN_TOOLS, END, RETURN, START, Message, Special
from .harmony.chat_completions import FUNCTIONS
from .kernels import registry
from .lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_ALPHA, TARGETS, TRAINING_STATE, AdapterError, LoRAConfig,
                   adapter_files, adapter_weights, apply_lora, load_adapter_weights, non_finite, read_adapter_config)
from .model import Model
from .chat_file import chat_file_problem

LONG = ("truncate", "skip")
# Bounds on the settings: beyond them a run cannot work (MLX's schedule counts steps in 64 bits;
# the adapter's float32 update overflows; Adam's steps beyond 1 are never useful).
MAX_STEPS = 2**53
MAX_LEARNING_RATE = 1.0
SCHEDULES = ("cosine", "constant")  # the learning rate over the run: decayed to 0 at --iters, or not
LOGIT_CHUNK = 512  # trained positions unembedded at once: (512, vocab) float32 logits, 0.4 GB  # what to do with a conversation longer than --max-seq-len
OPTIMIZER_FILE = "optimizer.safetensors"
STEP_KEY = "step"  # in the checkpoint files' safetensors metadata
# Settings a resumed run must share with the run it continues.
RESUMED = ("rank", "alpha", "targets", "batch_size", "learning_rate", "schedule", "max_seq_len",
           "long", "seed", "grad_checkpoint")


class DataError(ValueError):
    """A training file or line that cannot be used, named with its line and field."""


# --------------------------------------------------------------------------------- rendering
def trained_turn_start(messages: list[Message]) -> int:
    """Index of the first message after the last user, system or developer message."""
    return 1 + max((i for i, m in enumerate(messages) if m.role != "assistant" and m.role != "tool"),
                   default=-1)


def render_for_training(messages: list[Message], tokenizer) -> tuple[list[int], list[bool]]:
    """(tokens, mask): the conversation as the model sees it at inference, and which tokens it
    samples there (mask[i] True: tokens[i] is in the loss)."""
    start = trained_turn_start(messages)
    history, turn = messages[:start], messages[start:]
    tokens = harmony.segments_to_tokens(harmony.render_conversation(history, for_completion=False),
                                        tokenizer)
    mask = [False] * len(tokens)
    prompted = harmony.segments_to_tokens([Special(START), "assistant"], tokenizer)
    last = max((i for i, m in enumerate(turn) if m.role == "assistant"), default=None)
    if last is None:
        raise DataError("no assistant message after the last user message: nothing to train on")
    if not turn[last].is_tool_call and (turn[last].channel != "final" or not turn[last].text.strip()):
        raise DataError("the last assistant message has no answer (its content is empty), and training "
                        "on it would teach the model to answer with nothing (give it content or leave "
                        "the line out)")
    for i, m in enumerate(turn):
        segments = harmony.render_message(m, where=f"messages[{start + i}]")
        if i == last and segments[-1] == END and m.channel == "final":
            segments[-1] = Special(RETURN)  # what the model samples to end its reply
        ids = harmony.segments_to_tokens(segments, tokenizer)
        tokens += ids
        if m.role != "assistant":
            mask += [False] * len(ids)
            continue
        previous = turn[i - 1] if i else None
        # A generation starts here when the prompt ended: at the turn's start, after a tool
        # result, after a call; then <|start|>assistant was the prompt's, not the model's.
        starts = previous is None or previous.role != "assistant" or previous.recipient not in (None, "all")
        given = len(prompted) if starts else 0
        mask += [False] * given + [True] * (len(ids) - given)
    return tokens, mask


def prompt_points(messages: list[Message]) -> list[int]:
    """Where generation starts at inference in the trained turn: message indices i such that the
    prompt is ``messages[:i]`` (for tests: the prompt must be a prefix of the training tokens)."""
    start = trained_turn_start(messages)
    return [i for i in range(start, len(messages))
            if messages[i].role == "assistant" and (
                i == start or messages[i - 1].role != "assistant"
                or messages[i - 1].recipient not in (None, "all"))]


# ------------------------------------------------------------------------------------- data
@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]
    line: int


def conversation_messages(data, where: str) -> list[Message]:
    """Harmony messages for one line's JSON; DataError naming ``where`` and the field."""
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        messages = []
        for i, m in enumerate(data["messages"]):
            if isinstance(m, dict) and m.get("thinking") is not None and m.get("reasoning") is not None:
                raise DataError(f"{where}: messages[{i}] has both 'reasoning' and 'thinking': give its "
                                "reasoning once")
            if isinstance(m, dict) and m.get("thinking") is not None and m.get("reasoning") is None:
                if not isinstance(m["thinking"], str):
                    raise DataError(f"{where}: messages[{i}].thinking must be a string, got "
                                    f"{type(m['thinking']).__name__}")
                if m.get("role") == "assistant":
                    m = {**m, "reasoning": m["thinking"]}
            messages.append(m)
        data = {**data, "messages": messages}
    problem = chat_file_problem(data)
    if problem:
        raise DataError(f"{where}: {problem}")
    called = {c["function"]["name"].split(".")[0] for m in data["messages"]
              for c in m.get("tool_calls") or []}
    tools = {t: t in called for t in BUILTIN_TOOLS}  # declared in the system message when used
    try:
        messages = harmony.from_chat_completions(data, date=data.get("date"), **tools)
    except harmony.HarmonyError as e:
        raise DataError(f"{where}: {e}") from None
    declared = {(t.get("function") or t).get("name") for t in data.get("tools") or []}
    for m in messages[trained_turn_start(messages):]:
        problem = _trained_call_problem(m, declared)
        if problem:
            raise DataError(f"{where}: the trained reply's call to {m.recipient} {problem}, and training on "
                            "it would teach the model such calls")
    return messages


def _trained_call_problem(m: Message, declared: set) -> str | None:
    """What is wrong with a call of the trained reply to a function: one the line does not
    declare in its tools, or arguments that are not JSON."""
    if not m.is_tool_call or not m.recipient.startswith(FUNCTIONS):
        return None
    name = m.recipient.removeprefix(FUNCTIONS)
    if name not in declared:
        return f"names a function the line's tools do not declare ({', '.join(sorted(declared)) or 'none'})"
    try:
        json.loads(m.text)
    except ValueError as e:
        return f"has arguments that are not JSON ({e})"
    return None


@dataclass
class DataReport:
    path: Path
    examples: int = 0
    truncated: list[int] = field(default_factory=list)  # line numbers
    skipped: list[int] = field(default_factory=list)
    long: str = "truncate"  # what was done with a conversation longer than max_seq_len (LONG)

    def lines(self, max_seq_len: int) -> list[str]:
        out = []
        for what, lines in (("truncated", self.truncated), ("skipped", self.skipped)):
            if lines:
                shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
                why = ""
                if what == "skipped" and self.long == "truncate":
                    why = (": cut to that length, none would keep any of the answer it trains on "
                           "(raise --max-seq-len to train on them)")
                out.append(f"{self.path}: {len(lines)} conversation(s) longer than {max_seq_len} "
                           f"tokens {what} (line {shown}){why}")
        return out


def load_data(path: str | os.PathLike, tokenizer, max_seq_len: int,
              long: str = "truncate", purpose: str = "train on") -> tuple[list[Example], DataReport]:
    """Every conversation of a JSONL file, rendered and masked. A conversation longer than
    ``max_seq_len`` tokens is cut there (``truncate``; skipped if nothing trained is left) or
    skipped (``skip``); the report lists them. ``purpose``: what the file is for, in the error
    when it holds none."""
    path = expand_user(path, DataError)
    if long not in LONG:
        raise ValueError(f"long must be one of {', '.join(LONG)}, got {long!r}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    report, examples = DataReport(path, long=long), []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            data = parse_json(line)
        except JSONProblem as e:
            raise DataError(f"{where}: {e}") from None
        try:
            tokens, mask = render_for_training(conversation_messages(data, where), tokenizer)
        except harmony.HarmonyError as e:
            raise DataError(f"{where}: {e}") from None
        except DataError as e:
            raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        if len(tokens) > max_seq_len:
            if long == "skip" or not any(mask[1:max_seq_len]):
                report.skipped.append(n)
                continue
            report.truncated.append(n)
            tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
        examples.append(Example(tokens, mask, n))
    if not examples:
        dropped = len(report.skipped)
        why = (" and were skipped" if long == "skip" else
               ", and cut to that length none keeps any of the answer it trains on: raise --max-seq-len")
        raise DataError(f"{path}: no conversations to {purpose}" + (
            f": all {dropped} are longer than --max-seq-len {max_seq_len} tokens{why}"
            if dropped else " (the file has none)"))
    report.examples = len(examples)
    return examples, report


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(expand_user(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- batches
def batch_groups(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Example indices in batches of similar length (less padding); the last may be smaller."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_for_step(groups: list[list[int]], seed: int, step: int) -> list[int]:
    """The batch of step ``step`` (0-based): each epoch visits every group once, in an order
    drawn from (seed, epoch), so a resumed run sees what an uninterrupted one would."""
    epoch, k = divmod(step, len(groups))
    return groups[np.random.default_rng((seed, epoch)).permutation(len(groups))[k]]


def make_batch(examples: list[Example]) -> tuple[mx.array, mx.array, mx.array, int]:
    """(inputs (B, L), targets at the trained positions (N,), those positions in the flattened
    (B*L) inputs (N,), tokens in the batch). Padding is never trained."""
    width = max(len(e.tokens) for e in examples) - 1
    inputs = np.zeros((len(examples), width), np.int32)
    targets, positions = [], []
    for b, e in enumerate(examples):
        inputs[b, :len(e.tokens) - 1] = e.tokens[:-1]
        trained = np.flatnonzero(np.asarray(e.mask[1:], bool))  # position i predicts token i+1
        positions.append(b * width + trained)
        targets.append(np.asarray(e.tokens, np.int32)[trained + 1])
    count = sum(len(e.tokens) for e in examples)
    return (mx.array(inputs), mx.array(np.concatenate(targets)),
            mx.array(np.concatenate(positions).astype(np.int32)), count)


# ------------------------------------------------------------------------------------- loss
def hidden_states(model: Model, inputs: mx.array, checkpoint: bool = False) -> mx.array:
    """The layers' output for inputs (B, L), as ``Model.__call__`` computes it without a cache;
    with ``checkpoint``, each layer's activations are recomputed in the backward pass."""
    x = model.embed_tokens(inputs)
    for layer in model.layers:
        x = _checkpointed(layer)(x) if checkpoint else layer(x)
    return x


def _checkpointed(layer: nn.Module):
    def run(params, x):
        layer.update(params)
        return layer(x)

    fn = mx.checkpoint(run)
    return lambda x: fn(layer.trainable_parameters(), x)


def loss_sum(model: Model, inputs, targets, positions, checkpoint: bool = False) -> mx.array:
    """Summed cross-entropy over the trained positions. Logits only where the loss counts, and
    LOGIT_CHUNK rows at a time, recomputed in the backward pass: float32 (rows, vocab) logits
    never exist for the whole batch at once."""
    x = hidden_states(model, inputs, checkpoint)
    h = x.reshape(-1, x.shape[-1])[positions]  # (N, D)

    def chunk_loss(i: int) -> mx.array:
        t = targets[i:i + LOGIT_CHUNK]  # ids: no gradient, so not an argument of the checkpoint
        return mx.checkpoint(lambda h: nn.losses.cross_entropy(
            model.lm_head(model.norm(h)).astype(mx.float32), t, reduction="sum"))(h[i:i + LOGIT_CHUNK])

    return sum(chunk_loss(i) for i in range(0, targets.size, LOGIT_CHUNK))


def mean_loss(model, inputs, targets, positions, checkpoint=False):
    return loss_sum(model, inputs, targets, positions, checkpoint) / targets.size


def evaluate(model: Model, examples: list[Example], batch_size: int,
             max_batches: int | None = None) -> float:
    """Mean loss per trained token over ``examples`` (``max_batches`` of its batches, spread over
    them from the shortest to the longest)."""
    total, count = 0.0, 0
    groups = batch_groups(examples, batch_size)
    if max_batches is not None and max_batches < len(groups):
        groups = [groups[i] for i in sorted(set(np.linspace(0, len(groups) - 1, max_batches).round().astype(int)))]
    for group in groups:
        inputs, targets, positions, _ = make_batch([examples[i] for i in group])
        total += loss_sum(model, inputs, targets, positions).item()
        count += targets.size
    return total / max(count, 1)


def make_step(model: Model, optimizer: optim.Optimizer, checkpoint: bool = False):
    """``step(inputs, targets, positions) -> loss``: one optimizer step, evaluated."""
    check_trainable(model)
    loss_and_grad = nn.value_and_grad(model, mean_loss)

    def step(inputs, targets, positions) -> mx.array:
        loss, grads = loss_and_grad(model, inputs, targets, positions, checkpoint)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        return loss

    return step


@contextmanager
def reference_ops():
    """The custom kernels have no gradients: run MLX's own operations while training."""
    old = os.environ.get(registry.ENV_VAR)
    os.environ[registry.ENV_VAR] = "off"
    registry.reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(registry.ENV_VAR, None)
        else:
            os.environ[registry.ENV_VAR] = old
        registry.reset()


# ------------------------------------------------------------------------------------ events
@dataclass
class Progress:
    step: int
    total: int
    loss: float  # mean over the steps since the last report
    tokens_per_s: float
    peak_gb: float
    elapsed_s: float  # training time in this run (not counting validation)
    eta_s: float


@dataclass
class Validation:
    step: int
    loss: float


@dataclass
class Saved:
    step: int
    path: Path
    final: bool


TrainEvent = Progress | Validation | Saved


@dataclass
class Settings:
    """Everything a run depends on (stored with the adapter; a resumed run must match)."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "experts")
    iters: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    max_seq_len: int = 2048
    long: str = "truncate"
    grad_checkpoint: bool = False
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int | None = None
    save_every: int = 100

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.alpha, tuple(self.targets))

    def problem(self) -> str | None:
        """What is wrong with these settings (read back from a file), or None."""
        def whole(v, least=1):
            return isinstance(v, int) and not isinstance(v, bool) and least <= v < MAX_STEPS
        def number(v, most):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= most
        checks = {"rank": whole(self.rank), "alpha": number(self.alpha, MAX_ALPHA),
                  "targets": isinstance(self.targets, tuple) and bool(self.targets)
                  and all(isinstance(t, str) and t in TARGETS for t in self.targets),
                  "iters": whole(self.iters), "batch_size": whole(self.batch_size),
                  "learning_rate": number(self.learning_rate, MAX_LEARNING_RATE),
                  "schedule": self.schedule in SCHEDULES, "max_seq_len": whole(self.max_seq_len),
                  "long": self.long in LONG, "grad_checkpoint": isinstance(self.grad_checkpoint, bool),
                  "seed": isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**64,
                  "steps_per_report": whole(self.steps_per_report), "steps_per_eval": whole(self.steps_per_eval),
                  "val_batches": self.val_batches is None or whole(self.val_batches),
                  "save_every": whole(self.save_every)}
        bad = next((name for name, ok in checks.items() if not ok), None)
        return f"{bad}: {getattr(self, bad)!r}" if bad else None


def read_state(directory: str | os.PathLike) -> dict:
    """What an interrupted or finished run left in its adapter directory (for --resume)."""
    directory = Path(directory)
    path = directory / TRAINING_STATE
    missing = [name for name in (TRAINING_STATE, OPTIMIZER_FILE) if not (directory / name).is_file()]
    if missing:
        raise DataError(f"{directory}: nothing to resume (no {' and no '.join(missing)})")
    state = read_json_file(path, DataError)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool) \
            or state["step"] < 0 or not isinstance(state.get("settings"), dict):
        raise DataError(f"{path}: damaged (step and settings expected)")
    config, settings = read_adapter_config(directory), state["settings"]
    if (config.rank, config.alpha, list(config.targets)) != \
            (settings.get("rank"), settings.get("alpha"), settings.get("targets")):
        raise DataError(f"{directory}: {TRAINING_STATE} and {ADAPTER_CONFIG} disagree on the rank, alpha "
                        "or targets (edited by hand?): this run cannot be resumed; start a new one")
    for name in (ADAPTER_WEIGHTS, OPTIMIZER_FILE):
        saved = saved_step(directory / name)
        if saved is not None and saved != state["step"]:
            raise DataError(f"{directory}: the save at step {max(saved, state['step'])} was cut short "
                            f"({name} is from step {saved}, {TRAINING_STATE} from step {state['step']}): "
                            "this run cannot be resumed exactly; start a new one")
    return state


def saved_step(path: Path) -> int | None:
    """The step a checkpoint file was saved at (None: saved before files were stamped); a
    DataError naming the file if it is missing, cut short or not safetensors."""
    try:
        with safe_open(str(path), "numpy") as f:
            stamp = (f.metadata() or {}).get(STEP_KEY)
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: damaged or missing ({e}): this run cannot be resumed; start a new one") from None
    return int(stamp) if stamp is not None and stamp.isdigit() else None


def check_trainable(model: Model) -> None:
    """An AdapterError unless every expert is resident. Streamed (expert_pool.py), a layer's
    experts sit in pool slots that later layers overwrite during the forward pass, so the backward
    pass would read other experts' weights."""
    pool = getattr(model, "expert_pool", None)
    if pool is not None:
        raise AdapterError(
            f"fine-tuning needs every expert on the GPU, and at this memory limit they are streamed "
            f"({pool.slots} of {pool.config.num_hidden_layers * pool.config.num_local_experts} in "
            "memory): a training step would compute its gradients with experts that later layers "
            "replaced. Train where the whole model fits (`gptoss-mlx doctor` shows the plans)")


def train(model: Model, base_model: str, train_set: list[Example], settings: Settings,
          out: str | os.PathLike, valid_set: list[Example] | None = None, data_digest: str = "",
          resume: dict | None = None, stop: threading.Event | None = None,
          recorded: dict | None = None) -> Iterator[TrainEvent]:
    """Train an adapter on ``model`` (a base model; wrapped in place) and save it in ``out``,
    yielding progress. ``resume``: :func:`read_state`'s dict, continued where it stopped.
    ``stop`` set: the run saves after the step under way and ends. ``recorded``: what else the
    run depends on (the CLI's: the dense precision and the base's weights), kept in its state
    for --resume to check. Runs on the calling thread (give it to the engine thread)."""
    out = Path(out)
    check_trainable(model)
    mx.random.seed(settings.seed)
    apply_lora(model, settings.lora)
    rate = settings.learning_rate
    if settings.schedule == "cosine":  # a function of the optimizer's step: resumes exactly
        rate = optim.cosine_decay(rate, settings.iters)
    optimizer = optim.Adam(learning_rate=rate)
    step = 0
    if resume is not None:
        load_adapter_weights(model, out / ADAPTER_WEIGHTS)
        optimizer.state = tree_unflatten(list(mx.load(str(out / OPTIMIZER_FILE)).items()))
        step = resume["step"]
    mx.eval(model.parameters())
    groups = batch_groups(train_set, settings.batch_size)
    step_fn = make_step(model, optimizer, settings.grad_checkpoint)

    def diverged(what: str) -> DataError:
        kept = f", the last checkpoint in {out} is kept" if (out / TRAINING_STATE).exists() else ""
        return DataError(f"{what}: training diverged (a lower --learning-rate?); nothing saved from it{kept}")

    def save(final: bool) -> Saved:
        """The adapter, the optimizer and the state, each written under a temporary name first,
        then renamed in that order: a save that fails (a full disk) leaves the last one whole.
        The first two are stamped with the step (a kill between the renames is told on
        --resume, by read_state)."""
        stamp = {STEP_KEY: str(step)}
        if non_finite(adapter_weights(model)):
            raise diverged(f"the adapter's weights became NaN or infinite by step {step}")
        tag = f"{os.getpid()}.tmp"
        written = [(out / f".{OPTIMIZER_FILE}.{tag}.safetensors", out / OPTIMIZER_FILE),
                   (out / f".{TRAINING_STATE}.{tag}", out / TRAINING_STATE)]
        try:
            pairs = adapter_files(model, out, settings.lora, base_model=base_model, weights_metadata=stamp)
            written = pairs + written
            mx.save_safetensors(str(written[2][0]), dict(tree_flatten(optimizer.state)), metadata=stamp)
            written[3][0].write_text(json.dumps({"step": step, "settings": _json_settings(settings),
                                                 "data": data_digest, **(recorded or {})}, indent=2))
            for tmp, path in written:
                os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # MLX's writer raises RuntimeError (a full disk)
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            kept = f"; the save before it is kept" if (out / TRAINING_STATE).exists() else ""
            raise DataError(f"saving step {step} in {out} failed ({e}): is the disk full?{kept}") from None
        return Saved(step, out, final)

    def validate() -> Validation:
        return Validation(step, evaluate(model, valid_set, settings.batch_size, settings.val_batches))

    with reference_ops():
        if valid_set and resume is None:
            yield validate()
        model.train()
        losses, tokens, timed, elapsed, first = [], 0, 0.0, 0.0, step
        mx.reset_peak_memory()
        while step < settings.iters and not (stop and stop.is_set()):
            t0 = time.perf_counter()
            inputs, targets, positions, count = make_batch(
                [train_set[i] for i in batch_for_step(groups, settings.seed, step)])
            loss = step_fn(inputs, targets, positions)
            step += 1
            dt = time.perf_counter() - t0
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise diverged(f"the loss became {losses[-1]} at step {step}")
            tokens, timed, elapsed = tokens + count, timed + dt, elapsed + dt
            if step % settings.steps_per_report == 0 or step == settings.iters:
                rate = (step - first) / elapsed
                yield Progress(step, settings.iters, sum(losses) / len(losses), tokens / timed,
                               mx.get_peak_memory() / 1e9, elapsed, (settings.iters - step) / rate)
                losses, tokens, timed = [], 0, 0.0
            if valid_set and (step % settings.steps_per_eval == 0 or step == settings.iters):
                yield validate()
            if step % settings.save_every == 0 and step < settings.iters:
                yield save(final=False)
        yield save(final=True)


def _json_settings(settings: Settings) -> dict:
    data = asdict(settings)
    data["targets"] = list(settings.targets)
    return data


def resumed_settings(state: dict, given: dict) -> Settings:
    """The saved run's settings, with ``given`` (explicit flags) applied where a resumed run may
    change them; a flag that contradicts a RESUMED setting is a DataError naming it."""
    saved = dict(state["settings"])
    saved["targets"] = tuple(saved.get("targets", ()))
    for name, value in given.items():
        if name in RESUMED and value != saved.get(name):
            flag = "--" + name.replace("_", "-")
            raise DataError(f"--resume: this run was started with {flag} {saved.get(name)!r}, "
                            f"not {value!r}; leave {flag} out to keep it")
        saved[name] = value
    try:
        settings = Settings(**saved)
    except TypeError as e:
        raise DataError(f"--resume: damaged {TRAINING_STATE} ({e})") from None
    problem = settings.problem()
    if problem:
        raise DataError(f"--resume: damaged {TRAINING_STATE} ({problem})")
    return settings


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"

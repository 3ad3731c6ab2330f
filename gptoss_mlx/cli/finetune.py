"""``gptoss-mlx finetune``: train a LoRA adapter on harmony conversations; ``gptoss-mlx fuse``:
merge one into a checkpoint. The data and the loop are in gptoss_mlx/finetune.py, the adapters in
gptoss_mlx/lora.py."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import finetune as ft
from ..config import ConfigError
from ..engine_thread import engine_thread
from ..files import regular_file_problem
from ..loading import (
    COPIED, CheckpointError, checkpoint_digest, checkpoint_tokenizer, find_layout, load, read_config,
    resolve_checkpoint, save_weights,
)
from ..lora import (
    ADAPTER_CONFIG, FUSED_EXPERT_ADAPTER, LEAST_SETTING, TARGETS, AdapterError, adapter_weights,
    expert_adapter_config, fuse_dense, hf_tensors, non_finite, read_adapter_config,
    requantize_experts, save_adapter,
)
from ..memory import MemoryPlan, MemoryPlanError, checkpoint_dense_bits, choose_plan, shorter_context, system_ram
from ..tokenizer import TokenizerError
from . import common
from .common import CLIError, add_model_argument, directory_path, note, positive_float, positive_int

BAR = 24  # characters of the progress bar
DEFAULTS = ft.Settings()


def register(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter on conversations (JSONL)",
                       description="Train a LoRA adapter on harmony conversations: one Chat "
                                   "Completions conversation per line, rendered exactly as at "
                                   "inference; the loss covers the assistant's last turn. "
                                   "Ctrl-C saves and stops; --resume continues.")
    add_model_argument(p)
    p.add_argument("--data", required=True, type=Path, metavar="TRAIN.jsonl", help="training conversations")
    p.add_argument("--valid", type=Path, metavar="VALID.jsonl", help="validation conversations")
    p.add_argument("--adapter-path", required=True, type=directory_path, metavar="OUT",
                   help="directory for the adapter (and the state --resume needs)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --adapter-path")
    group = p.add_argument_group("adapter (fixed once a run starts)")
    group.add_argument("--rank", type=count, help=f"LoRA rank (default {DEFAULTS.rank})")
    group.add_argument("--alpha", type=bounded(ft.MAX_ALPHA), help=f"LoRA alpha; the update is scaled by alpha/rank "
                                                   f"(default {DEFAULTS.alpha:g})")
    group.add_argument("--targets", type=targets_list, metavar=",".join(TARGETS),
                       help=f"what gets adapters (default {','.join(DEFAULTS.targets)})")
    group.add_argument("--seed", type=seed_number, help=f"initialization and data order (default {DEFAULTS.seed})")
    train = p.add_argument_group("training")
    train.add_argument("--iters", type=count, help=f"optimizer steps (default {DEFAULTS.iters})")
    train.add_argument("--batch-size", type=count, help=f"conversations per step (default {DEFAULTS.batch_size})")
    train.add_argument("--learning-rate", type=bounded(ft.MAX_LEARNING_RATE), help=f"Adam's learning rate (default {DEFAULTS.learning_rate:g})")
    train.add_argument("--schedule", choices=ft.SCHEDULES,
                       help="learning rate: cosine decay to 0 at --iters (default), or constant")
    train.add_argument("--max-seq-len", type=count,
                       help=f"tokens per conversation at most (default {DEFAULTS.max_seq_len})")
    train.add_argument("--long", choices=ft.LONG, help="a longer conversation is truncated "
                                                      "(default) or skipped; either is reported")
    train.add_argument("--grad-checkpoint", action="store_const", const=True,
                       help="recompute each layer in the backward pass: less memory, ~30%% slower")
    train.add_argument("--dense-bits", type=int, choices=[8, 4],
                       help="quantize attention and embeddings at load (less memory; the router stays bf16)")
    report = p.add_argument_group("reporting and saving")
    report.add_argument("--steps-per-report", type=count, help=f"default {DEFAULTS.steps_per_report}")
    report.add_argument("--steps-per-eval", type=count,
                        help=f"validation loss every N steps (default {DEFAULTS.steps_per_eval})")
    report.add_argument("--val-batches", type=count, help="validation batches (default: all)")
    report.add_argument("--save-every", type=count, help=f"save every N steps (default {DEFAULTS.save_every})")
    p.set_defaults(func=cmd_finetune)

    f = sub.add_parser("fuse", help="merge a LoRA adapter into a checkpoint",
                       description="Write a checkpoint in the published layout with the attention "
                                   "(and router) adapters merged into their weights. Expert "
                                   "adapters stay beside the MXFP4 experts (in OUT/"
                                   f"{FUSED_EXPERT_ADAPTER}, loaded with the checkpoint) unless "
                                   "--requantize-experts merges them, which rounds them to MXFP4 "
                                   "and reports the error.")
    add_model_argument(f)
    f.add_argument("--adapter", required=True, type=Path, help="the adapter directory")
    f.add_argument("--out", required=True, type=directory_path, help="new directory for the fused checkpoint")
    f.add_argument("--requantize-experts", action="store_true",
                   help="merge the expert adapters into the MXFP4 weights (lossy; the error is reported)")
    f.set_defaults(func=cmd_fuse)


def count(text: str) -> int:
    """argparse type: a whole number from 1 to below ft.MAX_STEPS."""
    value = positive_int(text)
    if value >= ft.MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be below 2**53, got {text}")
    return value


def bounded(most: float):
    """argparse type: a finite number from LEAST_SETTING to ``most``."""
    def number(text: str) -> float:
        value = positive_float(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text}")
        if value < LEAST_SETTING:
            raise argparse.ArgumentTypeError(f"must be at least {LEAST_SETTING:g} (less is 0 in float32), got {text}")
        return value
    return number


def seed_number(text: str) -> int:
    """argparse type: a seed MLX takes (0 to 2**64 - 1)."""
    value = positive_int(text, least=0)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2**64, got {text}")
    return value


def check_adapter_path(out: Path) -> None:
    """Before the model loads: ``out`` can take an adapter (a directory, or one that can be made;
    not a model checkpoint), so that a run is not lost at its first save."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--adapter-path {out} is a file, not a directory")
    if (out / "config.json").exists():
        raise CLIError(f"--adapter-path {out} holds a model checkpoint (config.json): the adapter "
                       "goes in a directory of its own")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise CLIError(f"--adapter-path {out} cannot be written: {e.strerror or e}") from None


def targets_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # each once
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(TARGETS)}, got {text!r}")
    return names


SETTING_FLAGS = ("rank", "alpha", "targets", "seed", "iters", "batch_size", "learning_rate",
                 "schedule", "max_seq_len", "long", "grad_checkpoint", "steps_per_report", "steps_per_eval",
                 "val_batches", "save_every")


def settings_for(args) -> tuple[ft.Settings, dict | None]:
    """(settings, the saved state when resuming): flags over defaults, or over the saved run."""
    given = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    out = args.adapter_path
    check_adapter_path(out)
    try:
        if args.resume:
            state = ft.read_state(out)
            settings = ft.resumed_settings(state, given)
            if state.get("data") != ft.file_digest(args.data):
                raise CLIError(f"--resume: {args.data} is not the data this run started with")
            return settings, state
        if (out / ADAPTER_CONFIG).exists() or (out / ft.TRAINING_STATE).exists():
            raise CLIError(f"{out} already holds an adapter: --resume continues its run, or "
                           "choose a new --adapter-path")
        return ft.Settings(**given), None
    except (ft.DataError, AdapterError, OSError) as e:
        raise CLIError(str(e)) from None


def cmd_finetune(args) -> int:
    problem = regular_file_problem(args.data) if os.path.exists(args.data) else None
    if problem:  # (a pipe read once to train and once more, empty, for the digest --resume checks)
        raise CLIError(f"--data {args.data}: {problem}; give a file (a run is resumed from the same one)")
    made = not args.adapter_path.exists()
    check_adapter_path(args.adapter_path)
    with run_lock(args.adapter_path, made):
        return finetune(args)


LOCK_FILE = ".finetune.lock"


@contextlib.contextmanager
def run_lock(out: Path, made: bool):
    """Hold ``out`` for this run: a second run on the same directory would overwrite this one's
    saves (both saying "Saved"). ``made`` (by this run): removed again if nothing was saved."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise CLIError(f"--adapter-path {out} is in use by another finetune run (process {holder or '?'}): "
                       "wait for it to end, or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        if made and {p.name for p in out.iterdir()} <= {LOCK_FILE}:  # nothing was saved
            (out / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        os.close(fd)


def finetune(args) -> int:
    settings, state = settings_for(args)
    if state and state["step"] >= settings.iters:
        raise CLIError(f"{args.adapter_path} is at step {state['step']} of {settings.iters}: "
                       "raise --iters to train on")
    try:
        directory = resolve_checkpoint(args.model)
        # the data first (with the checkpoint's tokenizer): a bad line costs no model load
        tokenizer = checkpoint_tokenizer(directory)
        train_set, report = ft.load_data(args.data, tokenizer, settings.max_seq_len, settings.long)
        valid_set = None
        notes = report.lines(settings.max_seq_len)
        if args.valid:
            valid_set, valid_report = ft.load_data(args.valid, tokenizer, settings.max_seq_len, settings.long,
                                                   purpose="validate on")
            notes += valid_report.lines(settings.max_seq_len)
        for line in notes:
            note(line)
        if (directory / FUSED_EXPERT_ADAPTER).is_dir():  # (found after the load, as "already has an adapter")
            raise CLIError(f"{directory} is a fused checkpoint whose expert adapter stays beside its experts "
                           f"({FUSED_EXPERT_ADAPTER}/): fine-tuning needs plain experts. Fuse it again with "
                           "--requantize-experts (the adapter merged into them), or train on the base model")
        base_digest = checkpoint_digest(directory)
        if state:
            check_same_base(args, directory, state, base_digest)
        memory_plan, context = training_plan(directory, args.dense_bits, settings.max_seq_len)
        print(f"Loading {directory} ...", flush=True)
        model, _ = engine_thread().call(load, directory, max_context=context, memory_plan=memory_plan)
        ft.check_trainable(model)
    except (CheckpointError, ConfigError, TokenizerError, ft.DataError, MemoryPlanError, ValueError) as e:
        raise CLIError(str(e)) from None
    trained = sum(sum(e.mask) for e in train_set)
    print(f"{len(train_set)} conversations, {sum(len(e.tokens) for e in train_set):,} tokens "
          f"({trained:,} trained)" + (f"; {len(valid_set)} for validation" if valid_set else ""))
    if settings.batch_size > len(train_set):
        note(f"--batch-size {settings.batch_size} is more than the {len(train_set)} "
             f"conversations: each step trains on all {len(train_set)}")
    where = f"resuming at step {state['step']}" if state else "from step 0"
    print(f"LoRA rank {settings.rank}, alpha {settings.alpha:g} on {', '.join(settings.targets)}; "
          f"{settings.iters} steps of {settings.batch_size}, {where}. Ctrl-C saves and stops.")
    stop = threading.Event()
    events = ft.train(model, str(Path(directory).resolve()), train_set, settings, args.adapter_path, valid_set,
                      ft.file_digest(args.data), state, stop,
                      recorded={"dense_bits": args.dense_bits, "base_digest": base_digest})
    show = ProgressLine(sys.stdout)
    # Ctrl-C, and a kill or a closed terminal: save after the step under way, then stop
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    requested = StopRequest(stop, show)
    previous = {sig: signal.signal(sig, lambda sig, _: requested(sig)) for sig in stopping}
    try:
        for event in engine_thread().stream(events):
            show.event(event)
    except (ft.DataError, AdapterError, OSError) as e:
        raise CLIError(str(e)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        show.end()
    if stop.is_set():
        show.note("Stopped early; the same command with --resume continues the run.")
        return 130
    return 0


def training_plan(directory: Path, dense_bits: int | None, max_seq_len: int) -> tuple[MemoryPlan, int]:
    """(the memory plan, its context) for training on ``directory``: every expert on the GPU (a
    training step cannot stream them: ft.check_trainable), sequences of ``max_seq_len`` tokens
    (not a chat's 32768-token KV cache). Where it does not fit, the MemoryPlanError names the
    smallest limit with every expert resident."""
    config = read_config(directory)
    if max_seq_len > config.max_position_embeddings:  # (trained past what the model can then read)
        raise ValueError(f"--max-seq-len {max_seq_len} is longer than {directory}'s context of "
                         f"{config.max_position_embeddings} tokens (max_position_embeddings)")
    context = max_seq_len
    try:
        return choose_plan(config, context, checkpoint_dense_bits(config, dense_bits),
                           unstreamable="fine-tuning trains with every expert"), context
    except MemoryPlanError as e:  # its advice in this command's terms
        raise MemoryPlanError(str(e).replace(shorter_context(4096), "a shorter --max-seq-len (4096 fits)"),
                              e.smallest_limit) from None


STOP_CAUSES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "the terminal closed"}


# A second stop this soon after the first is the same request: `timeout` signals the process and
# its group, a closing terminal sends SIGHUP through the shell and the kernel.
STOP_REPEAT_S = 1.5


class StopRequest:
    """First Ctrl-C (or SIGTERM, or a closed terminal): finish the step under way, save, stop.
    Ctrl-C again, from STOP_REPEAT_S after the first, quits without saving; any other repeat
    changes nothing (the save goes on)."""

    def __init__(self, stop: threading.Event, show: "ProgressLine"):
        self.stop, self.show, self.first = stop, show, None

    def __call__(self, sig: int = signal.SIGINT) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.stop.set()
            again = " (Ctrl-C again to quit without saving)" if sig == signal.SIGINT else ""
            self.show.note(f"{STOP_CAUSES.get(sig, 'Ctrl-C')}: stopping after this step and saving{again}")
        elif sig == signal.SIGINT and now - self.first >= STOP_REPEAT_S:
            raise KeyboardInterrupt


def check_same_base(args, directory, state: dict, base_digest: int) -> None:
    """--resume: the run goes on with the model (``base_digest``: its weights' checksum) and
    dense precision it started with (else its adapter would be trained on two models, and its
    ``base_model`` rewritten)."""
    config = json.loads((args.adapter_path / ADAPTER_CONFIG).read_text())
    base, here = config.get("base_model"), Path(directory).resolve()
    moved = isinstance(base, str) and Path(base).is_absolute() and Path(base) != here
    if "base_digest" in state:  # the same weights wherever they lie now (moved, copied)
        if state["base_digest"] != base_digest:
            raise CLIError(f"--resume: this run started on other weights ({base}), not those in {here}: "
                           "give that --model, or start a new run")
    elif moved:
        raise CLIError(f"--resume: this run started on {base}, not {here}: give that --model, or start a new run")
    if "dense_bits" in state and state["dense_bits"] != args.dense_bits:
        was = f"--dense-bits {state['dense_bits']}" if state["dense_bits"] else "no --dense-bits"
        raise CLIError(f"--resume: this run started with {was}: give the same")


class ProgressLine:
    """One progress line, redrawn in place on a terminal (a line per report otherwise); other
    messages print above it. Output that can no longer be written (a closed terminal, a pipe
    whose reader is gone: ``| tee`` ended by the same Ctrl-C) is dropped: the run goes on and
    saves."""

    def __init__(self, out):
        self.out, self.tty, self.shown = out, out.isatty(), False

    def event(self, event) -> None:
        if isinstance(event, ft.Progress):
            done = event.step / event.total
            bar = "━" * round(BAR * done) + "─" * (BAR - round(BAR * done))
            line = (f"step {event.step}/{event.total} {bar} {done:4.0%} · loss {event.loss:.3f} · "
                    f"{event.tokens_per_s:,.0f} tok/s · peak {event.peak_gb:.2f} GB · "
                    f"ETA {ft.format_eta(event.eta_s)}")
            if self.tty:
                self._write(f"\r\x1b[K{line}")
                self.shown = True
            else:
                self._write(line + "\n")
        elif isinstance(event, ft.Validation):
            self.note(f"step {event.step}: validation loss {event.loss:.3f}")
        elif isinstance(event, ft.Saved):
            self.note(f"{'Saved' if event.final else 'Checkpoint:'} the adapter at step "
                      f"{event.step} in {event.path}")

    def note(self, text: str) -> None:
        self.end()
        self._write(text + "\n")

    def end(self) -> None:
        if self.shown:
            self._write("\n")
            self.shown = False

    def _write(self, text: str) -> None:
        out = self.out  # (a stop signal's note may write, and drop it, between these lines)
        if out is None:
            return
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):  # EPIPE, EIO: nobody reads it any more
            self.out = None
            common.drop_output()


def cmd_fuse(args) -> int:
    with common.new_directory(args.out) as out:
        try:
            config = read_adapter_config(args.adapter)
            directory = resolve_checkpoint(args.model)
            stored = checkpoint_dense_bits(read_config(directory))
            if stored:
                raise CLIError(f"{directory}: its dense layers are stored {stored}-bit (a checkpoint "
                               "`models convert` wrote), and fusing needs them bf16: fuse into the "
                               "original checkpoint")
            print(f"Loading {directory} with the adapter {args.adapter} ...", file=sys.stderr, flush=True)
            # bf16 and every expert in memory, whatever this machine's GPU plan would choose to
            # run it: fusing reads each weight once and writes it out, within the RAM
            model, _ = engine_thread().call(load, directory, adapter=args.adapter, dense_bits=16,
                                            memory_limit=system_ram(), max_context=1)
            report = engine_thread().call(fuse, model, config, out, args.requantize_experts)
            for name in COPIED:  # tokenizer and generation config; an original/ layout's are one level up
                for folder in (find_layout(directory)[1], directory):
                    if (folder / name).is_file():  # the bytes, not a read-only mode
                        shutil.copyfile(folder / name, out / name)
                        break
        except (CheckpointError, ConfigError, TokenizerError, AdapterError, MemoryPlanError) as e:
            raise CLIError(str(e)) from None
        except OSError as e:  # a full disk (a traceback: a tester's, helper-150)
            raise CLIError(f"{args.out}: writing it failed ({e}); nothing was kept") from None
        kept = (out / FUSED_EXPERT_ADAPTER).is_dir()
    if report:
        print(report.summary())
    print(f"Saved {args.out}: {', '.join(t for t in config.targets if t != 'experts' or not kept)} "
          "merged" + (f"; the expert adapters stay beside the experts in {args.out / FUSED_EXPERT_ADAPTER} "
                      "(loaded with the checkpoint; --requantize-experts merges them)" if kept else ""))
    return 0


def fuse(model, config, out: Path, requantize: bool):
    """Merge the dense adapters (and, if asked, the expert adapters), then write ``out``; an
    AdapterError, before anything is written, where the merged weights are not finite."""
    fuse_dense(model)
    report = requantize_experts(model) if requantize and "experts" in config.targets else None
    tensors = hf_tensors(model)
    bad = non_finite({**tensors, **adapter_weights(model)})
    if bad:
        raise AdapterError(f"merged with the adapter, {bad} holds NaN or infinite values (its alpha "
                           f"{config.alpha:g} or its weights overflow): nothing was written")
    save_weights(out, tensors)
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2))
    experts = expert_adapter_config(config)
    if experts and adapter_weights(model):
        save_adapter(model, out / FUSED_EXPERT_ADAPTER, experts)
    return report

"""``gptoss-mlx models``: the checkpoints in the local Hugging Face cache; pull, remove, convert."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import mlx.nn as nn
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..config import ConfigError, ModelConfig
from ..hub import cache_dir, cached_folder, cached_models, other_model_type, remove, repo_folder
from ..loading import (
    COPIED, CheckpointError, find_layout, load_model, not_downloaded, resolve_checkpoint, save_weights, stream_problem,
)
from ..lora import FUSED_EXPERT_ADAPTER
from ..memory import DEFAULT_CONTEXT, GB, AFFINE_GROUP, MemoryPlanError, checkpoint_dense_bits, choose_plan
from . import common
from .common import CLIError, add_plan_options

def register(sub) -> None:
    p = sub.add_parser("models", help="list, download, remove and convert checkpoints",
                       description="The gpt-oss checkpoints in the local Hugging Face cache "
                                   "(HF_HUB_CACHE), and commands to pull, remove and convert them.")
    models = p.add_subparsers(dest="models_command", metavar="ACTION", required=True,
                              help="list, pull, rm or convert")

    q = models.add_parser("list", help="the gpt-oss checkpoints in the cache",
                          description="Repo, revision, size on disk, layout, and whether it "
                                      f"fits this machine at a {DEFAULT_CONTEXT}-token context.")
    q.set_defaults(func=cmd_list)

    q = models.add_parser("pull", help="download a checkpoint (checks memory and disk first)",
                          description="Download a checkpoint into the cache. Its config.json "
                                      "comes first: the memory plan and the free disk space "
                                      "are checked before the weights are fetched. An "
                                      "interrupted download resumes.")
    q.add_argument("repo", help="Hugging Face repo id, e.g. openai/gpt-oss-20b")
    add_plan_options(q)
    q.set_defaults(func=cmd_pull)

    q = models.add_parser("rm", help="delete a checkpoint from the cache",
                          description="Delete every cached revision of a gpt-oss repo (another model's "
                                      "repo in the shared cache is refused).")
    q.add_argument("repo", help="Hugging Face repo id")
    q.add_argument("--yes", "-y", action="store_true", help="do not ask before deleting")
    q.set_defaults(func=cmd_rm)

    q = models.add_parser("convert", help="save a checkpoint with quantized dense layers",
                          description="Quantize attention and embeddings once and save the result "
                                      "(experts stay MXFP4, the router bf16), so loading it needs "
                                      "no --dense-bits and less memory while loading.")
    q.add_argument("src", help="checkpoint directory or Hugging Face repo id")
    q.add_argument("out", type=common.directory_path, help="new directory for the converted checkpoint")
    q.add_argument("--dense-bits", type=int, choices=[8, 4], required=True,
                   help="bits of the quantized dense layers")
    q.set_defaults(func=cmd_convert)


def _size(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6)):
        if n >= 0.1 * scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def fits(config: ModelConfig, directory: Path) -> str:
    """Whether the checkpoint in ``directory`` fits this machine, as loading it would plan (an
    mlx-lm conversion's experts cannot stream: loading.stream_problem). One not downloaded
    whole (its layout says so) is planned as the published layouts are."""
    context = min(DEFAULT_CONTEXT, config.max_position_embeddings)
    try:
        unstreamable = stream_problem(directory)
    except CheckpointError:
        unstreamable = None
    try:
        p = choose_plan(config, context, checkpoint_dense_bits(config), unstreamable=unstreamable)
    except MemoryPlanError as e:
        return f"no (needs {e.smallest_limit / GB:.1f} GB)"
    if p.streamed:
        return f"yes, {p.arrangement}"
    return f"yes ({p.total / GB:.1f} of {p.limit / GB:.1f} GB)"


def cmd_list(args) -> int:
    try:
        models, others, damaged = cached_models()
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    if not models:
        print(f"No gpt-oss checkpoints in {cache_dir()}. Download one with "
              "`gptoss-mlx models pull openai/gpt-oss-20b`.")
    else:
        rows = [("REPO", "REVISION", "SIZE", "LAYOUT", f"FITS AT {DEFAULT_CONTEXT} TOKENS")]
        for m in models:
            refs = f" ({', '.join(m.refs)})" if m.refs else ""
            rows.append((m.repo_id, m.revision[:8] + refs, _size(m.size), m.layout, fits(m.config, m.path)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        print(f"\nCache: {cache_dir()}")
    if others:
        print(f"({others} other model repo{'s' if others > 1 else ''} in the cache not shown)")
    if damaged:
        print("\nDamaged downloads (`gptoss-mlx models rm REPO` deletes one; `models pull REPO` "
              "fetches it again):")
        for repo_id, why in damaged:
            print(f"  {repo_id}: {common.terminal_safe(why)}")
    return 0


def cmd_pull(args) -> int:
    if not args.repo.strip():
        raise CLIError("models pull: name the repo, e.g. openai/gpt-oss-20b")
    try:
        validate_repo_id(args.repo)
    except HFValidationError:
        raise CLIError(f"models pull: {args.repo!r} is not a Hugging Face repo id (owner/name, e.g. "
                       "openai/gpt-oss-20b)") from None
    args.model, args.hub_only = args.repo, True  # (a folder of that name here is not the repo)
    try:
        directory, context, _ = common.prepare(args)
    except CLIError as e:
        if str(e) == not_downloaded(args.repo):  # its advice is to run this command
            raise CLIError(not_downloaded(args.repo, pulling=True)) from None
        raise
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    config = ModelConfig.from_file(find_layout(directory)[1] / "config.json")
    print(f"{args.repo} is ready: {directory} ({_size(size)}); fits at {DEFAULT_CONTEXT} tokens: "
          f"{fits(config, directory)}")
    return 0


def cmd_rm(args) -> int:
    try:  # before asking (it asked for --yes to delete a repo it did not have: a tester's, helper-152)
        folder = cached_folder(args.repo)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    other = other_model_type(folder)
    if other:  # (a typo deleted another model from the shared cache, which `list` does not show: helper-150)
        raise CLIError(f"{args.repo} is not a gpt-oss checkpoint (its config.json says model_type "
                       f"{other!r:.40}): `models rm` deletes gpt-oss checkpoints only; nothing deleted")
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"pass --yes to delete {args.repo} without a terminal to ask on")
        try:
            answer = input(f"Delete {args.repo} from {cache_dir()}? [y/N] ")
        except EOFError:  # Ctrl-D (a traceback: the re-attack, helper-153)
            answer = ""
            print()
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing deleted.")
            return 0
    link = repo_folder(args.repo)
    target = os.path.realpath(link) if link.is_symlink() else None
    try:
        freed = remove(args.repo)
    except CheckpointError as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"could not delete {args.repo}: {e}") from None
    if target is not None:
        print(f"Removed {args.repo} from the cache: it was a link to {target}, whose files stay.")
        return 0
    print(f"Deleted {args.repo} ({_size(freed)} freed).")
    return 0


def cmd_convert(args) -> int:
    with common.new_directory(args.out) as out:
        try:
            directory = resolve_checkpoint(args.src)
            weights_dir = find_layout(directory)[1]
            raw = json.loads((weights_dir / "config.json").read_text())
            if ModelConfig.from_dict(raw).quantization:
                raise CLIError(f"{args.src}: its dense layers are already quantized")
            print(f"Loading {directory} and quantizing the dense layers to {args.dense_bits} bits ...",
                  file=sys.stderr, flush=True)
            model = load_model(directory, dense_bits=args.dense_bits)
        except (CheckpointError, ConfigError, json.JSONDecodeError) as e:
            raise CLIError(str(e)) from None
        except ValueError as e:  # MLX: a dimension its quantization cannot group
            raise CLIError(f"{args.src}: cannot quantize its dense layers to {args.dense_bits} bits: {e}") from None
        raw["quantization"] = {"group_size": AFFINE_GROUP, "bits": args.dense_bits, "mode": "affine"}
        try:
            save_weights(out, dict(nn.utils.tree_flatten(model.parameters())))
            (out / "config.json").write_text(json.dumps(raw, indent=2))
            for name in COPIED:  # an original/ layout keeps its tokenizer one level up
                for folder in (weights_dir, directory):
                    if (folder / name).is_file():
                        shutil.copy(folder / name, out / name)
                        break
            if (directory / FUSED_EXPERT_ADAPTER).is_dir():  # a fused fine-tune's, for the experts kept as they were
                shutil.copytree(directory / FUSED_EXPERT_ADAPTER, out / FUSED_EXPERT_ADAPTER)
        except OSError as e:  # a full disk (a traceback: a tester's, helper-150)
            raise CLIError(f"{args.out}: writing it failed ({e}); nothing was kept") from None
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"Saved {args.out} ({_size(size)}); load it with --model {shlex.quote(str(args.out))}")
    return 0

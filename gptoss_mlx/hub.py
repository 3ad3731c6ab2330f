"""Models in the local Hugging Face cache: what is there, its config before its weights, how much
a download still needs, and removing one. Downloads themselves go through
``loading.resolve_checkpoint`` (huggingface-hub's progress bars, resuming and cache)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, scan_cache_dir
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.errors import (
    CacheNotFound, EntryNotFoundError, GatedRepoError, HFValidationError,
    LocalEntryNotFoundError, RepositoryNotFoundError,
)

from .config import ConfigError, ModelConfig
from .files import MAX_JSON_BYTES, env_folder, regular_file_problem
from .loading import (
    HUB_IGNORE, HUB_PATTERNS, CheckpointError, find_layout, looks_like_repo_id, not_downloaded,
    offline as _offline,
)


def cache_dir() -> Path:
    """The Hugging Face cache: HF_HUB_CACHE (its ~ expanded: huggingface_hub's own expansion of
    a ~name of no user was a traceback, helper-158), else the library's default."""
    return env_folder("HF_HUB_CACHE") or Path(hub_constants.HF_HUB_CACHE)


def fetch_config(repo_id: str) -> Path:
    """The repo's config.json alone (from the cache, else downloaded): enough to plan memory
    before any weights are fetched."""
    try:
        path = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir(),
                               local_files_only=_offline())
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face Hub") from None
    except GatedRepoError:
        raise CheckpointError(f"{repo_id}: gated; log in with `hf auth login` first") from None
    except (LocalEntryNotFoundError, OSError) as e:  # before EntryNotFoundError, its base; OSError: no connection
        if isinstance(e, LocalEntryNotFoundError) and repo_folder(repo_id).is_dir():
            raise CheckpointError(damaged(repo_id, "no config.json where its ref points")) from None
        raise CheckpointError(not_downloaded(repo_id)) from None
    except EntryNotFoundError:
        raise CheckpointError(f"{repo_id}: the repo has no config.json; not a gpt-oss model") from None
    except HFValidationError:
        raise CheckpointError(f"{repo_id}: no such directory (and not a Hugging Face repo id)") from None
    except ValueError as e:  # huggingface-hub's own, e.g. a ref naming a path outside the snapshot
        raise CheckpointError(damaged(repo_id, str(e)[:200])) from None
    return Path(path)


def damaged(repo_id: str, why: str) -> str:
    """A cached download that cannot be read (as `models list` names it)."""
    return (f"{repo_id}: its download in {cache_dir()} is damaged ({why}): delete it with `gptoss-mlx "
            f"models rm {repo_id}` and fetch it again with `gptoss-mlx models pull {repo_id}`")


def wanted(filename: str) -> bool:
    """Whether ``models pull`` / ``load`` fetch this file of a repo."""
    return (any(fnmatch.fnmatch(filename, p) for p in HUB_PATTERNS)
            and not any(fnmatch.fnmatch(filename, p) for p in HUB_IGNORE))


def download_bytes(repo_id: str) -> int:
    """Bytes a pull still has to download (0 when offline: nothing can be fetched anyway)."""
    if _offline():
        return 0
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception:  # noqa: BLE001 - no network (httpx's errors are no OSError), an HTTP error...
        return 0  # unknown: the download itself falls back to the cache or says what failed
    blobs = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "blobs"
    total = 0
    for f in info.siblings or []:
        sha = f.lfs.sha256 if f.lfs else f.blob_id
        if wanted(f.rfilename) and not (blobs / str(sha)).exists():
            total += f.size or 0
    return total


def check_free_disk(repo_id: str) -> None:
    """Refuse a download that the disk holding the cache cannot take."""
    need = download_bytes(repo_id)
    folder = cache_dir()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CheckpointError(f"{repo_id} needs {need / 1e9:.1f} GB more on disk but {folder} has "
                              f"{free / 1e9:.1f} GB free; free some space or set HF_HUB_CACHE")


@dataclass
class CachedModel:
    repo_id: str
    revision: str  # commit hash
    refs: tuple[str, ...]
    size: int  # bytes on disk
    path: Path  # the snapshot directory
    layout: str  # hf, original, mlx, or why it cannot load ("incomplete: ...")
    config: ModelConfig | None


def _scan():
    """huggingface-hub's scan of the cache (None if there is no cache yet)."""
    root = cache_dir()
    if os.path.lexists(root) and not root.is_dir():
        raise CheckpointError(f"{root} (the Hugging Face cache, HF_HUB_CACHE) is not a directory")
    try:
        return scan_cache_dir(root)
    except CacheNotFound:
        return None
    except OSError as e:  # a folder in it that cannot be read (huggingface-hub's scan stops there)
        raise CheckpointError(f"{e.filename or root}: cannot be read ({e.strerror or e}), in the Hugging Face "
                              "cache (HF_HUB_CACHE)") from None


def cached_models() -> tuple[list[CachedModel], int, list[tuple[str, str]]]:
    """gpt-oss snapshots in the cache, how many other model repos it holds, and the model repos
    too damaged to scan (repo id, why: a blob missing, say), which ``remove`` still deletes."""
    info = _scan()
    if info is None:
        return [], 0, []
    found, others, damaged = [], 0, {}
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not _is_repo_id(repo.repo_id):  # (a folder such as models--..--x)
            continue
        revisions = []
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            try:
                config = ModelConfig.from_file(rev.snapshot_path / "config.json")
            except (ConfigError, OSError, ValueError) as e:
                if _damaged_ours(rev.snapshot_path / "config.json"):  # ours, damaged: not "another model"
                    damaged.setdefault(repo.repo_id, str(e))
                continue
            try:
                layout, _ = find_layout(rev.snapshot_path)
            except CheckpointError as e:
                layout = "incomplete: " + str(e).removeprefix(f"{rev.snapshot_path}: ")
            revisions.append(CachedModel(repo.repo_id, rev.commit_hash, tuple(sorted(rev.refs)),
                                         rev.size_on_disk, rev.snapshot_path, layout, config))
        found += revisions
        others += not revisions and repo.repo_id not in damaged
    for warning in info.warnings:
        # (the folder's name ends at a "/", or at the ")" of "refer to missing commit hashes (PATH)")
        folder = re.search(r"models--([\w.-]+?)--([\w.-]+)", str(warning))
        repo_id = f"{folder[1]}/{folder[2].rstrip('.')}" if folder else ""
        if _is_repo_id(repo_id):  # HF repo names hold no "--": the folder names its repo unambiguously
            damaged.setdefault(repo_id, str(warning))  # (not a folder such as models--..--x: remove refuses it)
    return found, others, sorted(damaged.items())


def _is_repo_id(name: str) -> bool:
    """Whether the Hub could have a repo of this name (``remove`` takes it)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return looks_like_repo_id(name)


def _damaged_ours(config_file: Path) -> bool:
    """Whether a config.json that does not load still names gpt-oss's model type, or is no JSON
    at all (cut short: damaged, whatever model it was)."""
    try:
        if regular_file_problem(config_file) or config_file.stat().st_size > MAX_JSON_BYTES:
            return config_file.exists()  # a FIFO (reading it blocked `models list`), a device, a huge file
        data = json.loads(config_file.read_bytes())
    except ValueError:
        return True
    except OSError:
        return False
    return isinstance(data, dict) and data.get("model_type") == "gpt_oss"


def repo_folder(repo_id: str) -> Path:
    """The cache's folder of a model repo (huggingface-hub's naming)."""
    return cache_dir() / f"models--{repo_id.replace('/', '--')}"


def cached_folder(repo_id: str) -> Path:
    """The cache's folder of ``repo_id`` (maybe a link, or damaged); a CheckpointError when the
    cache has none."""
    _scan()  # the cache is a directory, or not there
    folder = repo_folder(repo_id)
    if not looks_like_repo_id(repo_id) or not os.path.lexists(folder):
        raise CheckpointError(f"{repo_id} is not in the Hugging Face cache ({cache_dir()})")
    return folder


def other_model_type(folder: Path) -> str | None:
    """The model type a cached repo's snapshots name when it is another model's (its
    config.json readable, and none of them gpt-oss's); None for ours, a damaged download, or one
    whose config cannot be read (those stay removable)."""
    types = set()
    for config_file in folder.glob("snapshots/*/config.json"):
        try:
            if regular_file_problem(config_file) or config_file.stat().st_size > MAX_JSON_BYTES:
                continue
            data = json.loads(config_file.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("model_type"), str):
            types.add(data["model_type"])
    return None if not types or "gpt_oss" in types else sorted(types)[0]


def remove(repo_id: str) -> int:
    """Delete every cached revision of ``repo_id`` (its whole folder: snapshots, blobs, parts
    of interrupted downloads; a damaged download too); returns the bytes freed. A folder that
    is a link (moved to another disk) loses the link, and its files stay where they are."""
    folder = cached_folder(repo_id)
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink()
        return 0
    freed = sum(f.lstat().st_size for f in folder.rglob("*") if not f.is_symlink() and f.is_file())
    shutil.rmtree(folder)
    return freed

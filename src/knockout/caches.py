"""Where caches live, by the usual conventions, and what a hub name resolved to in Hugging Face's cache.

- knockout's own caches (converted GGUF models) live under ``$XDG_CACHE_HOME/knockout`` (``~/.cache/knockout`` when
  ``XDG_CACHE_HOME`` is unset): :func:`knockout_cache_dir`, read when it is called.
- Hugging Face's caches are Hugging Face's: the hub cache is ``huggingface_hub.constants.HF_HUB_CACHE`` (from
  ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), which transformers and datasets use.
  :func:`hub_commit` reads it to record which commit a hub name (and revision) meant.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def knockout_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/knockout``, or ``~/.cache/knockout`` when ``XDG_CACHE_HOME`` is unset or empty (the XDG
    base directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "knockout"


def hub_cache_dir() -> Path:
    """Hugging Face's hub cache folder (``HF_HUB_CACHE``, else ``$HF_HOME/hub``; as huggingface_hub resolves it)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_commit(repo_id: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """The commit that ``repo_id`` at ``revision`` (a branch or tag, default ``main``; or a commit hash) resolves to
    in the local hub cache: the hash in ``{repo_type}s--{org}--{name}/refs/{revision}``, or the commit itself when
    its snapshot is there. ``None`` when the cache does not know it (the repository or revision was never
    downloaded)."""
    folder = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    rev = revision or "main"
    if _COMMIT.match(rev):
        return rev if (folder / "snapshots" / rev).is_dir() else None
    ref = folder / "refs" / rev
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT.match(commit) else None

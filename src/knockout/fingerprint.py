"""A model's fingerprint: a sha256 that changes when its weights change, recorded with statistics and run folders.

What is hashed, cheapest first:

- a **local folder** (or a Hugging Face hub snapshot in the local cache): its ``config.json`` and weight files
  (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``; only the ``--gguf-file`` when one is named): each
  file's name and the sha256 of its bytes. A file in the hub cache is a link to a blob named by its sha256 (for the
  large files git LFS stores), so it is not read at all; other large files are read once and their sha256 is cached
  in ``~/.cache/knockout/sha256/`` keyed by path, size and modification time;
- a **GGUF file** (and the built-in models, which are GGUF files in packages): the sha256 of the file;
- a **model object** handed in from Python (``run_sweep(cfg, loaded=...)``): its ``state_dict`` tensors (name,
  dtype, shape, bytes; an offloaded tensor by name, dtype and shape only).

The same files at another path (an absolute path, a copied folder, the hub cache) give the same fingerprint. The
fingerprint is ``{"sha256": ..., "of": "files" | "tensors", "files": [...]}`` (``revision``: the hub commit, when
known); :func:`same_model` compares two.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from knockout.errors import KnockoutError
from knockout.files import file_sha256, tensors_sha256, text_sha256

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def files_fingerprint(files: dict[str, Path], revision: str | None = None) -> dict:
    """The fingerprint of ``files`` (name in the model -> path): sha256 over each name and its content's sha256."""
    listing = "".join(f"{name}\0{file_sha256(files[name], 'model file')}\n" for name in sorted(files))
    out = {"sha256": text_sha256(listing), "of": "files", "files": sorted(files)}
    if revision:
        out["revision"] = revision
    return out


def folder_files(folder: Path, gguf_file: str | None = None) -> dict[str, Path]:
    """The files of a model folder that make the model: ``config.json`` and the weight files (the named GGUF file
    alone when one is given)."""
    if gguf_file:
        path = folder / gguf_file
        return {gguf_file: path} if path.is_file() else {}
    files = {p.name: p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    if not files:
        return {}
    if (folder / "config.json").is_file():
        files["config.json"] = folder / "config.json"
    return files


def _hub_snapshot(name: str, filename: str = "config.json", revision: str | None = None) -> tuple[Path, str] | None:
    """The local cache's snapshot folder of hub model ``name`` at ``revision`` (a branch, tag or commit; default the
    main branch) and its commit, if its ``filename`` is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        found = try_to_load_from_cache(name, filename, revision=revision)
    except Exception:  # not a valid repo id
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    return snapshot, snapshot.name


def source_fingerprint(model: str, gguf_file: str | None = None, revision: str | None = None) -> dict | None:
    """The fingerprint of the files ``model`` (a ``--model`` value, at hub ``revision``) loads from, without loading
    it; ``None`` when they cannot be found (a hub model not in the local cache yet)."""
    from knockout.loading import resolve_source

    source, gguf = resolve_source(model, gguf_file)
    folder, commit = Path(source), None
    local = folder.is_dir()
    if not local:
        snapshot = _hub_snapshot(source, gguf or "config.json", revision)
        if snapshot is None:
            return None
        folder, commit = snapshot
    files = folder_files(folder, gguf)
    if not files and local:
        what = f"no file {gguf!r}" if gguf else "no weight files (" + ", ".join(f"*{s}" for s in WEIGHT_SUFFIXES) + ")"
        raise KnockoutError(f"the model folder {model!r} holds {what}; give a model folder, a .gguf file or a hub name")
    if not files:
        return None
    return files_fingerprint(files, commit)


def tensors_fingerprint(model: torch.nn.Module) -> dict:
    """The fingerprint of a model object's ``state_dict`` (:func:`knockout.files.tensors_sha256`: name, dtype, shape
    and bytes of each tensor; a tensor without data, e.g. offloaded to disk, by name, dtype and shape)."""
    return {"sha256": tensors_sha256(model.state_dict()), "of": "tensors"}


def model_fingerprint(
    model: str | None, gguf_file: str | None = None, loaded: torch.nn.Module | None = None, revision: str | None = None
) -> dict:
    """The fingerprint of a run's model (at hub ``revision``): its files when they can be found, else the tensors of
    ``loaded``."""
    found = source_fingerprint(model, gguf_file, revision) if model else None
    if found is not None:
        return found
    if loaded is None:
        raise ValueError("the model's files were not found; pass the loaded model")
    return tensors_fingerprint(loaded)


def same_model(a: dict | None, b: dict | None) -> bool | None:
    """Whether two fingerprints are of the same weights; ``None`` when one is missing or they were made differently
    (files against tensors), so that they cannot be compared."""
    if not a or not b or a.get("of") != b.get("of"):
        return None
    return a.get("sha256") == b.get("sha256")


def describe(fp: dict | None) -> str:
    """A short description of a fingerprint for messages: ``files sha256 1a2b3c4d5e6f``."""
    if not fp:
        return "none recorded"
    return f"{fp.get('of', '?')} sha256 {str(fp.get('sha256', '?'))[:12]}"

"""Files and hashes: atomic writes, checksummed safetensors, and every sha256 knockout computes.

The run folder (:mod:`knockout.runfolder`), statistics (:mod:`knockout.stats`), learned constants
(:mod:`knockout.ablation.optimal`), data identities and model fingerprints all write and hash through this module,
which imports nothing of knockout but its error type:

- :func:`write_atomic`: a temporary file with a unique name, renamed into place, so a reader sees the old version or
  the new one; a full disk is one :class:`KnockoutError`. A folder a process holds as a run folder's writer
  (:class:`knockout.runfolder.RunLock`, registered in :data:`HELD`) is checked to be still the one locked;
- :func:`tensors_sha256` (a checksum of named tensors, stored in a safetensors file's metadata under
  :data:`CHECKSUM_KEY`), :func:`load_checked` (read and verify such a file);
- :func:`file_sha256` (a file's bytes; remembered per path, size and modification time, and cached on disk for large
  files), :func:`text_sha256`, :func:`neuron_set_hash`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

import torch

from knockout.errors import KnockoutError

log = logging.getLogger(__name__)

CHECKSUM_KEY = "sha256"
#: Files at least this large have their sha256 cached on disk (smaller ones are hashed again in a new process).
CACHE_MIN_BYTES = 64 << 20
SHA256_CACHE = Path.home() / ".cache" / "knockout" / "sha256"
_CHUNK = 8 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MEMO: dict[tuple, str] = {}

#: Run folders this process writes as their one writer: folder -> an object with ``still_held()`` (the lock).
HELD: dict[Path, object] = {}


# -- writing ----------------------------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file and a rename, so readers never see half a
    file. Creates the parent folder. The temporary file's name is unique (``.NAME.PID.RANDOM.tmp``), so two writers
    never share one. In a run folder this process holds locked, the lock is checked first (a folder moved away or
    replaced meanwhile is not written). A failed write (a full disk) removes the temporary file and raises
    :class:`KnockoutError`."""
    path = Path(path)
    _check_lock_still_held(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, e) from e


def write_error(path: str | os.PathLike, e: OSError) -> KnockoutError:
    """The one-line error of a failed write of ``path``: a full disk or quota says to free space and re-run."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return KnockoutError(
            f"no space left on the device while writing {str(path)!r}: free some space, then re-run the same command "
            "(a sweep resumes where it stopped)"
        )
    return KnockoutError(f"could not write {str(path)!r}: {e.strerror or e}")


def _check_lock_still_held(path: Path) -> None:
    """Raise if ``path`` lies in a run folder this process locked and the folder was moved away or replaced since."""
    if not HELD:
        return
    target = path.absolute()
    for run_dir, lock in list(HELD.items()):
        if not target.is_relative_to(run_dir):
            continue
        if not lock.still_held():
            raise KnockoutError(
                f"the run folder {str(run_dir)!r} was moved away or replaced while this process was writing it; "
                "stopped, so that its files do not mix with another run's. Re-run the command to resume whatever "
                "folder is there now"
            )
        folder = target.parent
        while not folder.exists() and folder != run_dir:
            folder = folder.parent
        if not folder.resolve().is_relative_to(run_dir.resolve()):
            raise KnockoutError(
                f"{str(target.parent)!r} leads outside the run folder {str(run_dir)!r} (a link): knockout never "
                "writes through a link in a run folder; remove it and re-run"
            )


# -- checksummed safetensors ------------------------------------------------------------------------------------------
def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over ``tensors`` in name order: each name, dtype, shape and raw bytes (a tensor without data, on the
    ``meta`` device, by name, dtype and shape). Stored in a safetensors file's metadata and checked on load, so
    damaged tensor data is found; also a model's fingerprint by its tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type != "meta" and t.numel():
            t = t.detach().to("cpu").contiguous()
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_safetensors(path: str | os.PathLike, remedy: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; an unreadable file is a :class:`KnockoutError` naming it, with
    ``remedy`` (what to do)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise KnockoutError(f"{str(path)!r} is damaged ({type(e).__name__}: {e}); {remedy}") from e
    return tensors, meta


def verify_checksum(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, remedy: str) -> None:
    """Raise if ``meta``'s checksum is missing or does not match ``tensors`` (read from ``path``)."""
    expected = meta.get(CHECKSUM_KEY)
    if expected is None or tensors_sha256(tensors) != expected:
        raise KnockoutError(f"{str(path)!r} is damaged (its checksum does not match its data); {remedy}")


def load_checked(path: str | os.PathLike, remedy: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a checksummed safetensors file (:func:`read_safetensors`, then
    :func:`verify_checksum`)."""
    tensors, meta = read_safetensors(path, remedy)
    verify_checksum(path, tensors, meta, remedy)
    return tensors, meta


def save_checked(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write ``tensors`` to a safetensors file with ``meta`` and their checksum (:func:`tensors_sha256`)."""
    from safetensors.torch import save

    write_atomic(path, save(tensors, metadata={**meta, CHECKSUM_KEY: tensors_sha256(tensors)}))


# -- hashes -----------------------------------------------------------------------------------------------------------
def text_sha256(text: str) -> str:
    """The sha256 of ``text`` (UTF-8), as hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, what: str = "file") -> str:
    """The sha256 of a file's bytes, read in chunks. A link into a hub cache's ``blobs/`` folder named by a sha256
    is that sha256 (not read). Remembered in this process per path, size and modification time; files of at least
    :data:`CACHE_MIN_BYTES` are also cached in :data:`SHA256_CACHE`. An unreadable file is a :class:`KnockoutError`
    naming it as ``what``."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
            return target.name
    try:
        real = path.resolve()
        st = real.stat()
    except OSError as e:
        raise KnockoutError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e
    memo = (str(real), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _MEMO:
        return _MEMO[memo]
    key = cached = None
    if st.st_size >= CACHE_MIN_BYTES:
        key = text_sha256(json.dumps(list(memo)))
        try:
            cached = (SHA256_CACHE / key).read_text().strip()
        except OSError:
            pass
    if cached is not None and _HEX64.fullmatch(cached):
        value = cached
    else:
        if key is not None:
            log.info("hashing %s (%.1f GB); cached for next time", real, st.st_size / 1e9)
        digest = hashlib.sha256()
        try:
            with open(real, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except OSError as e:
            raise KnockoutError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from e
        value = digest.hexdigest()
        if key is not None:
            try:
                SHA256_CACHE.mkdir(parents=True, exist_ok=True)
                tmp = SHA256_CACHE / f".{key}.{os.getpid()}.tmp"
                tmp.write_text(value)
                os.replace(tmp, SHA256_CACHE / key)
            except OSError as e:  # a read-only home costs only the speed-up
                log.debug("could not cache the sha256 of %s: %s", real, e)
    _MEMO[memo] = value
    return value


def neuron_set_hash(neurons: Sequence[torch.Tensor]) -> str:
    """A short hash of a neuron set (per layer, the sorted indices): the same set gives the same hash."""
    h = hashlib.sha256()
    for layer, idx in enumerate(neurons):
        h.update(f"|{layer}:".encode())
        h.update(torch.sort(idx.detach().cpu().long()).values.numpy().tobytes())
    return h.hexdigest()[:16]


def load_artifact(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a run folder's ``artifacts/`` file (what a method learned), checked against their checksum; a
    damaged file is a :class:`KnockoutError` that names it and says to delete it (it is learned again)."""
    return load_checked(path, f"delete {str(path)!r} (what it holds is learned again on the next run) and re-run")[0]

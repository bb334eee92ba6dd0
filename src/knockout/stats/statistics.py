"""All layers' statistics, saved to and loaded from safetensors with metadata naming the model and settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from knockout.errors import KnockoutError
from knockout.runfolder import CHECKSUM_KEY, tensors_sha256, verify_checksum, write_atomic
from knockout.stats.running import DEFAULT_EPS, DEFAULT_LIMIT, HistGrid, LayerStats

FORMAT = "knockout.stats/1"


class Statistics:
    """Per-layer :class:`LayerStats` plus ``meta``, a flat ``str -> str`` dict identifying model and data.

    ``meta["model"]`` is the model identity (see :func:`knockout.loading.model_identity`); :meth:`check_model`
    compares it with the model at hand so that statistics of one model are never applied to another.
    """

    def __init__(self, widths: list[int], eps: float = DEFAULT_EPS, limit: float = DEFAULT_LIMIT, meta=None):
        self.grid = HistGrid(eps, limit)  # checked here, once, and shared by the layers
        self.layers = [LayerStats(w, grid=self.grid) for w in widths]
        self.meta: dict[str, str] = dict(meta or {})

    @property
    def eps(self) -> float:
        return self.grid.eps

    @property
    def limit(self) -> float:
        return self.grid.limit

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        return [s.width for s in self.layers]

    @property
    def n_tokens(self) -> int:
        return self.layers[0].count if self.layers else 0

    def add(self, layer: int, x: torch.Tensor) -> None:
        """Add ``[n_tokens, width]`` activations of one layer."""
        self.layers[layer].add(x)

    def merge(self, other: Statistics) -> Statistics:
        """Add ``other``'s data to this one (in place; returns self). Equal to one pass over both datasets."""
        if other.widths != self.widths:
            raise KnockoutError(f"cannot merge statistics of layer widths {other.widths} into {self.widths}")
        for mine, theirs in zip(self.layers, other.layers):
            mine.merge(theirs)
        return self

    def means(self) -> list[torch.Tensor]:
        return [s.mean.float() for s in self.layers]

    def peaks(self) -> list[torch.Tensor]:
        return [s.peak().float() for s in self.layers]

    # -- io ---------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (a temporary file renamed into place)."""
        tensors = {
            f"layer{i}.{name}": t.cpu().contiguous()
            for i, s in enumerate(self.layers)
            for name, t in s.state_dict().items()
        }
        meta = dict(
            self.meta, format=FORMAT, eps=repr(self.eps), limit=repr(self.limit), widths=json.dumps(self.widths)
        )
        meta[CHECKSUM_KEY] = tensors_sha256(tensors)
        write_atomic(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        meta = read_metadata(path)
        remedy = "delete it so the statistics are recollected (or run `knockout stats` again)"
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise KnockoutError(f"{str(path)!r} is not a readable safetensors statistics file ({e}); {remedy}") from e
        verify_checksum(path, tensors, meta, remedy)
        meta.pop(CHECKSUM_KEY, None)
        widths = json.loads(meta.pop("widths"))
        stats = cls(widths, eps=float(meta.pop("eps")), limit=float(meta.pop("limit")))
        meta.pop("format")
        stats.meta = meta
        for i, s in enumerate(stats.layers):
            s.load_state_dict({name: tensors[f"layer{i}.{name}"] for name in _STATE})
        return stats

    def check_finite(self, source: str = "statistics") -> None:
        """Raise if a mean, variance, minimum or maximum is NaN or infinite, naming the first layer and neuron (NaN or
        infinite activations, or a damaged file; folding such a value into W_O would poison every result)."""
        for i, s in enumerate(self.layers):
            if s.count == 0:
                continue
            for name in ("mean", "m2", "min", "max"):
                bad = (~torch.isfinite(getattr(s, name))).nonzero()
                if len(bad):
                    j = int(bad[0])
                    raise KnockoutError(
                        f"{source}: layer {i} neuron {j} has {name} {float(getattr(s, name)[j])} "
                        f"({len(bad)} neuron(s) of that layer are not finite): the model gave NaN/inf activations "
                        "or the file is damaged; check the model and data (e.g. --dtype float32), or delete the file"
                    )

    def check_model(self, identity: dict, source: str = "statistics") -> None:
        """Raise if these statistics were collected on a model other than ``identity`` describes."""
        mine = json.loads(self.meta.get("model", "{}"))
        diff = {k: (mine.get(k), v) for k, v in identity.items() if mine.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: file has {a!r}, model has {b!r}" for k, (a, b) in diff.items())
            raise KnockoutError(
                f"{source} were collected on a different model ({detail}). "
                "Use statistics collected on this model, or delete the file so they are recomputed."
            )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a statistics file (``format``, ``widths``, ``eps``, ``limit``, ``model`` ...), checked to
    be a readable knockout statistics file."""
    path = Path(path)
    if not path.is_file():
        raise KnockoutError(f"statistics file {str(path)!r} does not exist; run `knockout stats` to create it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise KnockoutError(f"{str(path)!r} is not a readable safetensors statistics file: {e}") from e
    if meta.get("format") != FORMAT:
        raise KnockoutError(
            f"{str(path)!r} is not a knockout statistics file (format {meta.get('format')!r}, "
            f"expected {FORMAT!r}); recompute it with `knockout stats`"
        )
    return meta


def load_layer(path: str | os.PathLike, layer: int) -> LayerStats:
    """One layer's statistics, read without loading the other layers (for reports on large models)."""
    meta = read_metadata(path)
    widths = json.loads(meta["widths"])
    if not 0 <= layer < len(widths):
        raise KnockoutError(f"layer {layer} is out of range: the statistics have {len(widths)} layers")
    stats = LayerStats(widths[layer], eps=float(meta["eps"]), limit=float(meta["limit"]))
    with safe_open(str(path), framework="pt") as f:
        stats.load_state_dict({name: f.get_tensor(f"layer{layer}.{name}") for name in _STATE})
    return stats


_STATE = (*LayerStats.TENSORS, "count", "k_lo")

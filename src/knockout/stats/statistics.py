"""All layers' statistics, saved to and loaded from safetensors with metadata naming the model and settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from knockout.errors import KnockoutError
from knockout.files import CHECKSUM_KEY, tensors_sha256, verify_checksum, write_atomic
from knockout.stats import centres
from knockout.stats.running import AUTO, DEFAULT_EPS, DEFAULT_LIMIT, HistGrid, LayerStats

FORMAT = "knockout.stats/2"
"""Each layer's histogram stored per neuron (``hist``, ``hist_lo``, ``hist_bins``: see
:meth:`LayerStats.state_dict`)."""
FORMAT_TABLE = "knockout.stats/1"
"""Each layer's histogram stored as one ``[width, n_bins]`` table from bin ``k_lo``; still read (converted on
load)."""


class Statistics:
    """Per-layer :class:`LayerStats` plus ``meta``, a flat ``str -> str`` dict identifying model and data.

    ``meta["model"]`` is the model identity (see :func:`knockout.loading.model_identity`); :meth:`check_model`
    compares it with the model at hand so that statistics of one model are never applied to another.

    ``limit`` is a number or ``"auto"`` (:func:`knockout.stats.running.auto_limit` of the widths); ``grid``, if
    given, replaces ``eps`` and ``limit``.

    How well the centres are determined: statistics made by :func:`knockout.stats.collect_stats` also hold, per
    layer, the centres (:data:`knockout.stats.centres.HALF_CENTRES`) of each neuron computed on two disjoint halves
    of the collection (its even- and odd-numbered batches): ``half_centres[layer][name]`` is ``[2, width]``
    (float64, row 0 half A, row 1 half B) and ``half_tokens`` the halves' token counts. They are saved with the
    statistics and read by :meth:`centre_spread` and :meth:`centre_se`. Statistics made otherwise (by hand, merged,
    or extended with more data, which would make them stale) have none (``half_centres is None``).
    """

    def __init__(
        self,
        widths: list[int],
        eps: float = DEFAULT_EPS,
        limit: float | str = DEFAULT_LIMIT,
        meta=None,
        grid: HistGrid | None = None,
    ):
        self.grid = grid if grid is not None else HistGrid.of(eps, limit, widths)  # checked once, shared by layers
        self.layers = [LayerStats(w, grid=self.grid) for w in widths]
        self.meta: dict[str, str] = dict(meta or {})
        self.half_centres: list[dict[str, torch.Tensor]] | None = None
        self.half_tokens: tuple[int, int] | None = None

    @classmethod
    def from_halves(cls, a: Statistics, b: Statistics) -> Statistics:
        """The statistics of two disjoint halves of a collection together, with each half's centres
        (:attr:`half_centres`): the centres of ``a`` and ``b`` are computed, then ``b`` is merged into ``a``
        (which is changed and returned: its histograms, counts, minima and maxima are those of one pass over both
        halves exactly; its means and variances up to float64 rounding)."""
        if a.widths != b.widths or a.grid != b.grid:
            raise KnockoutError("the halves of a collection must have the same widths, eps and limit")
        tokens = (a.n_tokens, b.n_tokens)
        halves = []
        for la, lb in zip(a.layers, b.layers):
            ca, cb = centres.centre_values(la), centres.centre_values(lb)
            halves.append({name: torch.stack([ca[name], cb[name].to(ca[name].device)]) for name in ca})
        a.merge(b)
        a.half_centres, a.half_tokens = halves, tokens
        return a

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
        """Add ``other``'s data to this one (in place; returns self). Equal to one pass over both datasets. The
        halves' centres no longer describe the data and are dropped."""
        if other.widths != self.widths:
            raise KnockoutError(f"cannot merge statistics of layer widths {other.widths} into {self.widths}")
        for mine, theirs in zip(self.layers, other.layers):
            mine.merge(theirs)
        self.half_centres = self.half_tokens = None
        return self

    # -- how well the centres are determined ------------------------------------------------------------------
    def _halves(self, name: str) -> list[torch.Tensor]:
        if self.half_centres is None:
            raise KnockoutError(
                "these statistics have no split-half centres (only a collection by `knockout stats` or a sweep "
                "computes them); recollect them"
            )
        if name not in self.half_centres[0]:
            raise KnockoutError(f"no split-half values of {name!r}; known: {', '.join(self.half_centres[0])}")
        return [h[name] for h in self.half_centres]

    def centre_spread(self, name: str) -> list[torch.Tensor]:
        """Per layer, ``[width]`` ``|A - B|``: how far apart centre ``name`` (``mean``, ``median``, ``peak``,
        ``mode``, ``peak-smooth``) is on the two halves of the collection (NaN where a half has no value)."""
        return [(h[0] - h[1]).abs() for h in self._halves(name)]

    def centre_se(self, name: str) -> list[torch.Tensor]:
        """Per layer, ``[width]`` the standard error of centre ``name`` over the whole collection, estimated from
        the halves (:func:`knockout.stats.centres.half_se`: ``|A - B| / 2`` for equal halves, a ``1 / sqrt(N)``
        approximation)."""
        n_a, n_b = self.half_tokens or (0, 0)
        return [centres.half_se(h[0], h[1], n_a, n_b) for h in self._halves(name)]

    def centre_summary(self, names: tuple[str, ...] | None = None, tol: float = centres.DETERMINED_STD) -> dict:
        """``{name: summary}`` how well each centre is determined over all neurons
        (:func:`knockout.stats.centres.determination`): the share of neurons whose centre's standard error exceeds
        ``tol`` of their std, and the median of ``SE / |centre - mean|``."""
        names = names or tuple(self._halves_names())
        n_a, n_b = self.half_tokens or (0, 0)
        stds = [s.std for s in self.layers]
        means = [s.mean for s in self.layers]
        return {n: centres.determination(self._halves(n), n_a, n_b, means, stds, tol, n) for n in names}

    def _halves_names(self) -> list[str]:
        if self.half_centres is None:
            self._halves("")  # the error saying there are none
        return list(self.half_centres[0])

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
        meta["limit_mode"] = AUTO if self.grid.auto else "fixed"
        if self.half_centres is not None:
            for i, halves in enumerate(self.half_centres):
                for name, t in halves.items():
                    tensors[f"layer{i}.half_a.{name}"] = t[0].cpu().contiguous()
                    tensors[f"layer{i}.half_b.{name}"] = t[1].cpu().contiguous()
            meta["half_tokens"] = json.dumps(list(self.half_tokens))
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
        stats = cls(widths, grid=_grid(meta))
        for key in ("format", "eps", "limit", "limit_mode"):
            meta.pop(key, None)
        half_tokens = meta.pop("half_tokens", None)
        stats.meta = meta
        for i, s in enumerate(stats.layers):
            s.load_state_dict({name: tensors[f"layer{i}.{name}"] for name in _state_keys(tensors, i)})
        if half_tokens is not None:
            stats.half_tokens = tuple(json.loads(half_tokens))
            stats.half_centres = [_half_centres(tensors, i) for i in range(len(widths))]
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
    if meta.get("format") not in (FORMAT, FORMAT_TABLE):
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
    stats = LayerStats(widths[layer], grid=_grid(meta))
    with safe_open(str(path), framework="pt") as f:
        stats.load_state_dict({name: f.get_tensor(f"layer{layer}.{name}") for name in _state_keys(f.keys(), layer)})
    return stats


def _half_centres(tensors: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = f"layer{layer}.half_a."
    names = [k[len(prefix) :] for k in tensors if k.startswith(prefix)]
    return {n: torch.stack([tensors[prefix + n], tensors[f"layer{layer}.half_b.{n}"]]) for n in names}


def _grid(meta: dict[str, str]) -> HistGrid:
    """The histogram grid a file's metadata records."""
    return HistGrid(float(meta["eps"]), float(meta["limit"]), auto=meta.get("limit_mode") == AUTO)


def _state_keys(keys, layer: int) -> tuple[str, ...]:
    """The names of layer ``layer``'s state in a file with tensors ``keys``: :attr:`LayerStats.STATE`, or in a
    file of :data:`FORMAT_TABLE`, the table ``hist`` and its first bin ``k_lo``."""
    if f"layer{layer}.hist_lo" in keys:
        return LayerStats.STATE
    return (*LayerStats.TENSORS, "count", "hist", "k_lo")

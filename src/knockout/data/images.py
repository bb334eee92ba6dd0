"""Image sources and classification batches for vision transformers (ViT and relatives).

A *source* (``--data``) is one of

- a local folder with one subfolder per class holding image files (``.jpg .jpeg .png .bmp .gif .webp .tif
  .tiff``). A class's label is its index in the model's ``config.label2id`` when *every* subfolder name is a key
  there (e.g. folders named ``tench, Tinca tinca`` ... for an ImageNet model); otherwise it is the subfolder's
  index among the sorted subfolder names (``ImageFolder`` convention). The files are put in a fixed pseudo-random
  order (seed 1234, independent of the run's seeds); the first fifth is the evaluation part, the rest the
  collection part.
- a Hugging Face datasets name (optionally ``name:config``) with an image column (``image``/``img``, else the
  first column holding an image) and a label column (``label``/``labels``/``fine_label``), streamed. Collection
  uses the ``train`` split; evaluation uses ``validation`` (else ``test``), in stream order. For the paper's
  setting this is ``ILSVRC/imagenet-1k`` (gated: accept its terms on the Hub and log in), whose labels are the
  standard ImageNet class indices used by ``google/vit-base-patch16-224``'s ``id2label``.

Counts: ``eval_tokens`` is the number of evaluation *images* (each is one scored target; the paper used 1000), the
first ones of the evaluation part. ``stats_tokens`` counts pre-out positions as for text: the collection set is
the first ``ceil(stats_tokens / seq)`` images of the collection part, where ``seq`` is the pre-out sequence
length (``n_patches + 1`` for ViT). The evaluation images are the same for every seed.

Preprocessing uses the model's own image processor when it has one. Otherwise images are converted to RGB,
resized to ``image_size`` x ``image_size`` (bilinear), scaled to [0, 1] and normalised with ``image_mean`` and
``image_std``, the settings of :class:`ImageOptions` (CLI ``--image-size/--image-mean/--image-std``), defaulting to
the model config's ``image_size`` and 0.5 / 0.5 per channel (ViT's defaults).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from knockout.data.batch import Batch
from knockout.data.reading import split_items
from knockout.data.text import open_hf_split
from knockout.errors import KnockoutError
from knockout.options import OptionGroup, setting

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageOptions(OptionGroup):
    """Preprocessing of images for models without an image processor (one that has a processor uses its own)."""

    prefix = "image"
    title = "images without an image processor"

    size: int | None = setting(None, "resize to this (default: the model config's image_size)", "images", kind="int")
    mean: tuple[float, ...] = setting((0.5,), "normalisation mean: 1 or 3 numbers", "images", kind="floats")
    std: tuple[float, ...] = setting((0.5,), "normalisation std: 1 or 3 positive numbers", "images", kind="floats")

    def __post_init__(self):
        self._int("size", 1, optional=True)
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(_per_channel(getattr(self, name), f"image.{name}")))
        if min(self.std) <= 0:
            raise KnockoutError(f"image.std (--image-std) must be positive, got {list(self.std)}")


_IMAGE_COLUMNS = ("image", "img")
_LABEL_COLUMNS = ("label", "labels", "fine_label")


def folder_classes(root: Path, label2id: dict | None = None) -> dict[str, int]:
    """Subfolder name -> label: ``label2id``'s ids when it names every subfolder, else sorted-name indices."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise KnockoutError(f"image folder {str(root)!r} has no class subfolders (expected <root>/<class>/<image>)")
    if label2id and all(n in label2id for n in names):
        return {n: int(label2id[n]) for n in names}
    return {n: i for i, n in enumerate(names)}


def folder_items(root: Path, label2id: dict | None = None) -> list[tuple[Path, int]]:
    """Every ``(image file, label)`` of an image folder, sorted by class then file name."""
    classes = folder_classes(root, label2id)
    items = [
        (f, label)
        for name, label in classes.items()
        for f in sorted((root / name).rglob("*"))
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise KnockoutError(f"image folder {str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return items


def _open(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise KnockoutError(f"cannot read image {str(path)!r}: {e}") from e


def _hf_images(name: str, split: str, revision: str | None = None) -> Iterator[tuple[object, int]]:
    ds = open_hf_split(
        name, split, ("validation", "test"), "give a local image folder (<root>/<class>/<image>) as --data.", revision
    )
    for row in ds:
        image = next((row[c] for c in _IMAGE_COLUMNS if c in row), None)
        if image is None:
            image = next((v for v in row.values() if hasattr(v, "convert") and hasattr(v, "size")), None)
        label = next((row[c] for c in _LABEL_COLUMNS if c in row), None)
        if image is None or label is None:
            raise KnockoutError(f"dataset {name!r} needs an image column and a label column; it has {list(row)}")
        if int(label) < 0:  # unlabelled (e.g. ImageNet's test split)
            continue
        yield image, int(label)


def load_images(
    source: str, split: str, n: int, label2id: dict | None = None, revision: str | None = None
) -> list[tuple[object, int]]:
    """The first ``n`` ``(image, label)`` pairs of ``source``'s ``split`` (``"collect"`` or ``"eval"``); ``revision``:
    of a Hugging Face dataset.

    Images are returned as file paths (local folders) or PIL images (datasets); raises if there are fewer than ``n``.
    """
    if split not in ("collect", "eval"):
        raise ValueError(f"split must be collect or eval, got {split!r}")
    if n <= 0:
        raise KnockoutError(f"the number of images must be positive, got {n}")
    if source == "wiki":
        raise KnockoutError("image models need image data: give --data an image folder or a HF dataset name")
    path = Path(source).expanduser()
    if path.is_dir():
        items = split_items(folder_items(path, label2id), split)
    elif path.exists() or source.startswith((".", "/", "~")):
        raise KnockoutError(f"image data {source!r} is not a folder (expected <root>/<class>/<image>)")
    else:
        items = []
        for item in _hf_images(source, split, revision):
            items.append(item)
            if len(items) == n:
                break
    if len(items) < n:
        raise KnockoutError(
            f"the {split} part of {source!r} has only {len(items)} images but {n} were asked for; "
            "ask for fewer or give more images"
        )
    return items[:n]


def _numbers(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def _per_channel(value, name: str) -> list[float]:
    try:
        values = _numbers(value)
    except (TypeError, ValueError):
        raise KnockoutError(f"{name} needs 1 or 3 numbers, got {value!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise KnockoutError(f"{name} needs 1 or 3 numbers, got {value!r}")
    return values


def normalisation(processor, options: ImageOptions) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` per channel that model inputs are normalised with, ``(x - mean[c]) / std[c]``, or ``None``.

    The image processor's own ``image_mean`` / ``image_std`` when there is a processor (``None`` if it does not
    normalise); otherwise ``options.mean`` / ``options.std``, 0.5 by default (ViT's). The evaluation images and
    ``resample-pixels``'s random images both use this.
    """
    if processor is not None:
        if getattr(processor, "do_normalize", True) is False:
            return None
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None:
            return _numbers(mean), _numbers(std)
    return list(options.mean), list(options.std)


def preprocess(images: Sequence, processor, options: ImageOptions, config) -> torch.Tensor:
    """``[n, 3, H, W]`` float pixel values of PIL images or image paths."""
    pil = [_open(im) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
    if processor is not None:
        return processor(images=pil, return_tensors="pt")["pixel_values"]
    size = int(options.size or getattr(config, "image_size", 224))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalisation(None, options))
    import numpy as np
    from PIL import Image

    out = []
    for im in pil:
        im = im.resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        out.append((x - mean) / std)
    return torch.stack(out)


def image_batches(
    items: Sequence[tuple[object, int]], batch_size: int, processor, options: ImageOptions, config, seq: int
) -> list[Batch]:
    """Batches of ``{"pixel_values": [b, 3, H, W]}``, ``valid`` all True ``[b, seq]`` (``seq``: the pre-out
    sequence length, see :func:`knockout.hooks.preout_length`), targets = labels ``[b]``."""
    if batch_size <= 0:
        raise KnockoutError(f"batch size must be positive, got {batch_size}")
    num_labels = getattr(config, "num_labels", None)
    bad = [label for _, label in items if num_labels is not None and not 0 <= label < num_labels]
    if bad:
        raise KnockoutError(f"labels {sorted(set(bad))[:5]} are outside the model's {num_labels} classes")
    batches = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels = preprocess([im for im, _ in chunk], processor, options, config)
        valid = torch.ones((len(chunk), seq), dtype=torch.bool)
        labels = torch.tensor([label for _, label in chunk], dtype=torch.long)
        batches.append(Batch({"pixel_values": pixels}, valid, labels))
    return batches


def probe_inputs(source: str, processor, options: ImageOptions, config, revision=None) -> dict[str, torch.Tensor]:
    """Model inputs of one collection image, to measure the pre-out sequence length with."""
    probe = load_images(source, "collect", 1, getattr(config, "label2id", None), revision)
    return {"pixel_values": preprocess([probe[0][0]], processor, options, config)}


def image_eval_batches(
    source: str, n_images: int, batch_size: int, processor, options, config, seq, revision: str | None = None
) -> list[Batch]:
    """The first ``n_images`` evaluation images (the same for every seed)."""
    items = load_images(source, "eval", n_images, getattr(config, "label2id", None), revision)
    return image_batches(items, batch_size, processor, options, config, seq)


def image_stats_batches(
    source: str, n_positions: int, batch_size: int, processor, options, config, seq: int, revision: str | None = None
) -> list[Batch]:
    """Collection images holding at least ``n_positions`` pre-out positions (whole images of ``seq`` each)."""
    items = load_images(source, "collect", math.ceil(n_positions / seq), getattr(config, "label2id", None), revision)
    if len(items) >= 20 and len({label for _, label in items}) == 1:
        log.warning(
            "all %d collection images of %r have the same label: is its train split sorted?", len(items), source
        )
    return image_batches(items, batch_size, processor, options, config, seq)

"""Vision transformers: image-folder sources, labels, preprocessing, pre-out length, and a full sweep on a tiny ViT."""

import math

import pytest
import torch
import transformers as tf
from PIL import Image

import tiny
from knockout.config import SweepConfig
from knockout.data import tasks
from knockout.data.images import ImageOptions, folder_classes, load_images, preprocess
from knockout.errors import KnockoutError
from knockout.experiments.prepare import model_inputs
from knockout.hooks import capture, preout_length
from knockout.loading import load_model
from knockout.runfolder import RunFolder
from knockout.sites import find_sites

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def make_folder(root, per_class: int = 10, size: int = 40):
    """``root/<colour>/<i>.png``: solid-colour images, classes sorted blue, green, red -> 0, 1, 2."""
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(max(0, c - 3 * i) for c in rgb)
            Image.new("RGB", (size, size), shade).save(root / name / f"{i:03d}.png")
    return root


def saved_vit(folder, num_labels: int = 3, processor: bool = True) -> str:
    model = tiny.vit_classifier(num_labels)
    model.save_pretrained(folder)
    if processor:
        tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def _cfg(tmp_path, model, data, **kw):
    base = dict(
        model=model,
        out=str(tmp_path / "run"),
        data=data,
        methods=("zero", "mean", "peak"),
        fractions=(0.0, 0.5, 1.0),
        seeds=(0, 1),
        eval_tokens=5,
        stats_tokens=100,
        batch_size=4,
        device="cpu",
    )
    return SweepConfig(**{**base, **kw})


def eval_batches(cfg, loaded, seed):
    spec = cfg.data_spec()
    return tasks.eval_batches(spec, model_inputs(loaded, find_sites(loaded.model), spec), seed)


def stats_batches(cfg, loaded):
    spec = cfg.data_spec()
    return tasks.stats_batches(spec, model_inputs(loaded, find_sites(loaded.model), spec))


def test_folder_labels_are_sorted_class_names(tmp_path):
    root = make_folder(tmp_path / "images")
    assert folder_classes(root) == {"blue": 0, "green": 1, "red": 2}
    items = load_images(str(root), "eval", 6) + load_images(str(root), "collect", 24)
    assert len(items) == 30
    for path, label in items:
        assert label == {"blue": 0, "green": 1, "red": 2}[path.parent.name]
        # The label matches the image's colour.
        r, g, b = Image.open(path).convert("RGB").getpixel((0, 0))
        assert label == [b, g, r].index(max(r, g, b))


def test_folder_labels_follow_the_models_label2id(tmp_path):
    root = make_folder(tmp_path / "images", per_class=1)
    label2id = {"red": 0, "green": 1, "blue": 2, "other": 3}
    assert folder_classes(root, label2id) == {"red": 0, "green": 1, "blue": 2}
    # Not every folder named in label2id (e.g. the default LABEL_0 ...): fall back to sorted names.
    assert folder_classes(root, {"LABEL_0": 0, "LABEL_1": 1}) == {"blue": 0, "green": 1, "red": 2}


def test_eval_and_collect_parts_are_disjoint_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "images")
    eval_items = load_images(str(root), "eval", 6)
    collect_items = load_images(str(root), "collect", 24)
    assert not {p for p, _ in eval_items} & {p for p, _ in collect_items}
    assert load_images(str(root), "eval", 6) == eval_items
    assert load_images(str(root), "eval", 3) == eval_items[:3]
    assert len({label for _, label in eval_items}) > 1  # shuffled across classes
    with pytest.raises(KnockoutError, match="only 6 images"):
        load_images(str(root), "eval", 7)
    with pytest.raises(KnockoutError, match="image data"):
        load_images("wiki", "eval", 1)
    with pytest.raises(KnockoutError, match="no class subfolders"):
        (tmp_path / "empty").mkdir()
        load_images(str(tmp_path / "empty"), "eval", 1)


def test_preprocess_without_processor_uses_size_mean_std(tmp_path):
    root = make_folder(tmp_path / "images", per_class=1)
    img = root / "red" / "000.png"
    config = tiny.vit_classifier().config
    x = preprocess([img], None, ImageOptions(mean=(0.0, 0.5, 1.0), std=(0.5,)), config)
    assert x.shape == (1, 3, 32, 32)  # config.image_size
    expected = torch.tensor([(1 - 0) / 0.5, (0 - 0.5) / 0.5, (0 - 1) / 0.5])
    assert torch.allclose(x[0, :, 0, 0], expected)
    assert preprocess([img], None, ImageOptions(size=16), config).shape == (1, 3, 16, 16)
    # The model's own processor, when there is one.
    proc = tf.ViTImageProcessor(size={"height": 32, "width": 32})
    assert torch.allclose(
        preprocess([img], proc, ImageOptions(), config),
        proc(images=[Image.open(img)], return_tensors="pt")["pixel_values"],
    )


def test_vit_preout_has_patches_plus_one_positions(tmp_path):
    model = tiny.vit_classifier()
    cfg = model.config
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    seen = []
    with torch.inference_mode(), capture(find_sites(model), lambda s, z: seen.append(z.shape)):
        model(pixel_values=torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, n_patches + 1, cfg.hidden_size])] * cfg.num_hidden_layers
    assert preout_length(model, find_sites(model), {"pixel_values": torch.randn(1, 3, 32, 32)}) == n_patches + 1


def test_batches_of_a_loaded_vit(tmp_path):
    root = make_folder(tmp_path / "images")
    loaded = load_model(saved_vit(tmp_path / "vit"), device="cpu")
    assert loaded.task == "image" and loaded.processor is not None
    cfg = _cfg(tmp_path, "vit", str(root), stats_tokens=17 * 5 + 1)
    a, b = eval_batches(cfg, loaded, 0), eval_batches(cfg, loaded, 1)
    assert [x.targets.tolist() for x in a] == [x.targets.tolist() for x in b]  # same images for every seed
    assert sum(x.n_scored for x in a) == 5
    assert a[0].inputs["pixel_values"].shape == (4, 3, 32, 32)
    assert a[0].valid.shape == (4, 17) and a[0].valid.all()
    stats = stats_batches(cfg, loaded)
    assert sum(x.size for x in stats) == 6  # whole images holding at least 86 positions, at 17 per image
    assert sum(int(x.valid.sum()) for x in stats) == 6 * 17


def test_labels_outside_the_model_are_an_error(tmp_path):
    root = make_folder(tmp_path / "images")
    loaded = load_model(saved_vit(tmp_path / "vit", num_labels=2), device="cpu")
    with pytest.raises(KnockoutError, match="outside the model's 2 classes"):
        eval_batches(_cfg(tmp_path, "vit", str(root)), loaded, 0)


@pytest.mark.parametrize("processor", [True, False])
def test_full_sweep_on_tiny_vit(tmp_path, processor):
    import knockout

    root = make_folder(tmp_path / "images")
    folder = saved_vit(tmp_path / "vit", processor=processor)
    cfg = _cfg(tmp_path, folder, str(root))
    out = knockout.run_sweep(cfg, progress=False)
    rows = RunFolder(out).row_dicts()
    assert len(rows) == 2 * (1 + 3 * 3)
    assert {r["method"] for r in rows} == {"baseline", "zero", "mean", "peak"}
    assert all(r["n_eval"] == 5 for r in rows)
    assert all(math.isfinite(r["ce"]) and 0 <= r["top1"] <= 1 for r in rows)
    zero_full = [r for r in rows if r["method"] == "zero" and r["fraction"] == 1.0]
    base = [r for r in rows if r["method"] == "baseline"]
    assert zero_full[0]["ce"] != base[0]["ce"]  # ablating every neuron changes the output


def test_hf_image_dataset_splits_and_columns(monkeypatch):
    """A streamed HF dataset: validation for evaluation, train for collection, negative labels skipped."""
    import datasets

    def rows(split):
        colour = {"validation": (255, 0, 0), "train": (0, 0, 255)}[split]
        return [{"img": Image.new("RGB", (8, 8), colour), "label": lab} for lab in (2, -1, 1, 0, 2)]

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        if split not in ("validation", "train"):
            raise ValueError(f"unknown split {split}")
        return iter(rows(split))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_images("someone/images:cfg", "eval", 3)
    assert [label for _, label in items] == [2, 1, 0]
    assert items[0][0].getpixel((0, 0)) == (255, 0, 0)
    assert calls[-1] == ("someone/images", "cfg", "validation", True)
    items = load_images("someone/images", "collect", 4)
    assert [label for _, label in items] == [2, 1, 0, 2]
    assert items[0][0].getpixel((0, 0)) == (0, 0, 255)
    assert calls[-1][2] == "train"
    with pytest.raises(KnockoutError, match="only 4 images"):
        load_images("someone/images", "eval", 5)


def test_hf_image_dataset_offline_is_a_clear_error():
    with pytest.raises(KnockoutError, match="HF_HUB_OFFLINE"):
        load_images("nobody/no-such-images", "eval", 1)

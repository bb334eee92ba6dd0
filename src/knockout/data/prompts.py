"""Task evaluations: prompts with answers, from a JSONL file or the built-in ``ioi`` task (causal LMs only).

A task file is a ``.jsonl`` file whose lines are objects of one of two kinds (every line the same kind):

- ``{"prompt": ..., "answer": ...}``: every token of the answer is scored given the prompt and the answer's previous
  tokens (cross-entropy and top-1 accuracy on the answer's tokens);
- ``{"prompt": ..., "correct": ..., "incorrect": ...}``: one position is scored, the one after the prompt, by the
  logit difference ``logit[correct] - logit[incorrect]`` of the two answers' first tokens (Wang et al. 2022,
  indirect-object identification); top-1 is then the share of prompts where the correct token's logit beats the
  incorrect one's, and the cross-entropy is that of the correct token.

Tokens. The answer's tokens are those of ``prompt + answer`` after its longest common prefix with the tokens of
``prompt`` alone; the compared tokens are the first tokens where ``prompt + correct`` and ``prompt + incorrect``
differ, after their common prefix (the input). With a clean split (the prompt ends where a word ends, each answer
starts with its space: ``"... gave a drink to"``, ``" Mary"``) these are the answer's tokens and the answers' first
tokens; a tokenizer that merges the prompt's end with the answer cannot make them cross the boundary. Text is
tokenized as a whole, with the tokenizer's special tokens (as evaluation text is).

Splits. A task file's prompts are split like text documents (:func:`knockout.data.text.split_items`: the first fifth
of a fixed shuffle is the evaluation part, the rest the collection part). ``--eval-tokens`` counts evaluation
*prompts* for task data (at most that many are used: all of a smaller evaluation part). Statistics for mean and peak
are collected on the collection part's full texts (``prompt + answer``, or ``prompt + correct``), or on another
source given with ``--stats-data``.

The built-in ``ioi`` task (``--data ioi``) is generated offline from the templates, names, places and objects in
``ioi.json`` beside this module: each prompt draws a template, two different names, a place, an object and the order
of first mention (``A and B ... B gave ... to`` or ``B and A ... B gave ... to``; the answer is always the other
name, the indirect object). Generation is deterministic (seed 0 for the evaluation part, 1 for the collection part)
and the two parts use disjoint names (even and odd positions of the list), so they never share a prompt.

Counterfactuals (for ``patch``, the interchange intervention). A task line may give a ``counterfactual``: a string,
the prompt as it should read on the counterfactual run (the ``ioi`` task gives every prompt one). It is encoded as its
prompt is, with the same answer(s) (:func:`encode_counterfactual`), and :func:`counterfactual_batches` builds, batch
by batch, inputs aligned position by position with :func:`task_batches`' batches: patching copies position ``t`` of
the counterfactual run into position ``t`` of the evaluated one, so a counterfactual that tokenizes to another number
of tokens than its prompt is refused (a :class:`KnockoutError` naming the prompt and both counts). The ``ioi``
counterfactual is Wang et al.'s ABC prompt: the same template, place and object with the two names of first mention
and the repeated subject replaced by three other names of the same part, all different (``Then, A and B went to the
store. C gave a drink to``), so no name is repeated and nothing points at an indirect object. Each replacement name
has as many characters as the name it replaces where the part has one left (else any unused name); for
SmolLM2's tokenizer every name is one token, so every counterfactual has its prompt's length. Counterfactuals are
drawn from their own generator, seeded per prompt, so the prompts are those of the task without counterfactuals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from knockout.data.batch import IGNORE, Batch, padded_batches
from knockout.errors import KnockoutError
from knockout.inputs import MAX_LINE_CHARS, brief, brief_text, jsonl_values, loads_json

BUILTIN_TASKS = ("ioi",)
KINDS = ("answer", "contrast")
_IOI_VERSION = "ioi-v1"  # changes when the generator's output would change
_IOI_SEEDS = {"eval": 0, "collect": 1}
#: Characters one token may stand for, at most, when a prompt's length is bounded before it is tokenized: a prompt
#: longer than ``max_length`` times this cannot fit into ``max_length`` tokens (no common tokenizer has tokens this
#: long), so it is refused without tokenizing it.
MAX_CHARS_PER_TOKEN = 128
_IOI_ABC = "ioi-abc-v1"  # seeds the counterfactuals' names; changes when the counterfactuals would change


@dataclass(frozen=True)
class Prompt:
    """One task item: a prompt and either an ``answer`` or a ``correct`` and an ``incorrect`` answer."""

    prompt: str
    answer: str | None = None
    correct: str | None = None
    incorrect: str | None = None
    counterfactual: str | None = None
    """The prompt as read on the counterfactual run (``patch``); ``None``: the prompt has none."""

    @property
    def kind(self) -> str:
        return "answer" if self.answer is not None else "contrast"

    @property
    def text(self) -> str:
        """The full text (collection statistics): the prompt followed by its (correct) answer."""
        return self.prompt + (self.answer if self.answer is not None else self.correct)


# -- sources --------------------------------------------------------------------------------------------------------
def _first_object(path: Path) -> dict | None:
    """The first non-empty line of a ``.jsonl`` file as an object, or ``None`` (also for a line that is not a JSON
    object, or longer than :data:`~knockout.inputs.MAX_LINE_CHARS`: read no further than that)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            while line := f.readline(MAX_LINE_CHARS + 1):
                if len(line) > MAX_LINE_CHARS:
                    return None
                if line.strip():
                    item = loads_json(line, str(path))
                    return item if isinstance(item, dict) else None
    except (OSError, UnicodeDecodeError, KnockoutError):
        return None
    return None


def is_task_source(source: str) -> bool:
    """Whether ``source`` is task data: a built-in task (``ioi``) or a ``.jsonl`` file whose first line has a
    ``prompt``."""
    if source in BUILTIN_TASKS:
        return True
    path = Path(source).expanduser()
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    first = _first_object(path)
    return first is not None and "prompt" in first


def read_task_file(path: str | Path) -> list[Prompt]:
    """Every prompt of a task ``.jsonl`` file, validated: each line an object with a non-empty ``prompt`` and an
    ``answer``, or a ``correct`` and an ``incorrect`` (different) answer; every line of the same kind."""
    from knockout.data.reading import decode_text

    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KnockoutError(f"cannot read task file {str(path)!r}: {e.strerror or e}") from e
    text = decode_text(data, f"task file {str(path)!r}")
    items: list[Prompt] = []
    kind = None
    for n, obj in jsonl_values(text, str(path)):  # lines bounded in length and nesting before parsing
        where = f"{path}:{n}"
        item = _prompt(obj, where)
        if kind is None:
            kind = item.kind
        elif item.kind != kind:
            raise KnockoutError(
                f"{where} is a {item.kind} prompt but the first line is a {kind} prompt; one file holds one kind "
                '(all {"prompt", "answer"} or all {"prompt", "correct", "incorrect"})'
            )
        items.append(item)
    if len(items) < 2:
        raise KnockoutError(
            f"task file {str(path)!r} holds {len(items)} prompt(s); it needs at least two (evaluation and collection "
            "parts)"
        )
    return items


def _prompt(obj, where: str) -> Prompt:
    forms = '{"prompt": ..., "answer": ...} or {"prompt": ..., "correct": ..., "incorrect": ...}'
    if not isinstance(obj, dict):
        raise KnockoutError(f"{where}: expected an object {forms}")
    keys = set(obj) - {"counterfactual"}  # optional with either kind
    if keys == {"prompt", "answer"}:
        fields = ("prompt", "answer")
    elif keys == {"prompt", "correct", "incorrect"}:
        fields = ("prompt", "correct", "incorrect")
    else:
        raise KnockoutError(
            f"{where}: expected {forms}, got the fields {brief_text(', '.join(sorted(keys))) or 'none'}"
        )
    if "counterfactual" in obj:
        fields += ("counterfactual",)
    for f in fields:
        if not isinstance(obj[f], str) or not obj[f]:
            raise KnockoutError(f"{where}: {f!r} must be a non-empty string, got {brief(obj[f])}")
    if "correct" in obj and obj["correct"] == obj["incorrect"]:
        raise KnockoutError(f"{where}: the correct and the incorrect answer are the same ({brief(obj['correct'])})")
    return Prompt(**{f: obj[f] for f in fields})


def check(source: str, max_length: int | None = None) -> None:
    """Read a task source before the model is loaded, so a malformed file is reported at once (with ``max_length``,
    also an evaluation prompt longer than it can hold: :func:`check_length`)."""
    if source in BUILTIN_TASKS:
        return
    items = read_task_file(source)
    if max_length is not None:
        from knockout.data.reading import split_items

        for i, item in enumerate(split_items(items, "eval")):
            check_length(item, max_length, f"prompt {i} ({item.prompt[:40]!r}...) of {source!r}")


def has_counterfactuals(source: str) -> bool:
    """Whether every prompt of a task source gives a counterfactual (``ioi`` does; a file when each line has a
    ``counterfactual`` field). Reads no model: ``patch`` can be refused before one is loaded (their token lengths are
    checked by :func:`counterfactual_batches`, with the tokenizer)."""
    if source in BUILTIN_TASKS:
        return True
    return all(p.counterfactual is not None for p in read_task_file(source))


def identity(source: str) -> dict:
    """The built-in task's identity: its data file's sha256 with the generator's version."""
    digest = hashlib.sha256(_IOI_VERSION.encode() + b"\0" + _ioi_bytes()).hexdigest()
    return {"source": source, "sha256": digest}


def prompts(source: str, split: str) -> Iterator[Prompt]:
    """The prompts of a task source's ``split`` (``"eval"`` or ``"collect"``), in a fixed order (the built-in task's
    are an endless deterministic stream)."""
    from knockout.data.reading import SPLITS, split_items

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == "ioi":
        return ioi_prompts(split)
    return iter(split_items(read_task_file(source), split))


def texts(source: str, split: str) -> Iterator[str]:
    """The full texts of a task source's prompts (what statistics are collected on)."""
    return (p.text for p in prompts(source, split))


# -- the built-in IOI task --------------------------------------------------------------------------------------------
def _ioi_bytes() -> bytes:
    return importlib.resources.files("knockout.data").joinpath("ioi.json").read_bytes()


def ioi_data() -> dict:
    """Templates, names, places and objects of the built-in ``ioi`` task (``ioi.json``)."""
    return json.loads(_ioi_bytes().decode("utf-8"))


def ioi_prompts(split: str) -> Iterator[Prompt]:
    """The endless, deterministic stream of IOI prompts of ``split`` (see the module docstring)."""
    data = ioi_data()
    names = data["names"][0::2] if split == "eval" else data["names"][1::2]
    rng = random.Random(f"{_IOI_VERSION}:{_IOI_SEEDS[split]}")
    for index in itertools.count():
        template = rng.choice(data["templates"])
        io, s = rng.sample(names, 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        place, obj = rng.choice(data["places"]), rng.choice(data["objects"])
        prompt = template.format(N1=first, N2=second, S=s, PLACE=place, OBJECT=obj)
        a, b, c = abc_names(names, (first, second, s), random.Random(f"{_IOI_ABC}:{_IOI_SEEDS[split]}:{index}"))
        counterfactual = template.format(N1=a, N2=b, S=c, PLACE=place, OBJECT=obj)
        yield Prompt(prompt, correct=" " + io, incorrect=" " + s, counterfactual=counterfactual)


def abc_names(names: Sequence[str], replaced: Sequence[str], rng: random.Random) -> list[str]:
    """Names for Wang et al.'s ABC counterfactual of a prompt whose names are ``replaced`` (first mention, second
    mention, repeated subject): one per replaced name, all different from each other and from ``replaced``, each of
    the replaced name's length in characters where ``names`` has one left (a proxy for the same number of tokens),
    else any unused name. Deterministic given ``rng``'s state."""
    used = set(replaced)
    out = []
    for old in replaced:
        free = [n for n in names if n not in used]
        if not free:
            raise KnockoutError(f"the ioi task needs at least {len(replaced) + 3} names per part, got {len(names)}")
        same = [n for n in free if len(n) == len(old)]
        name = rng.choice(same or free)
        used.add(name)
        out.append(name)
    return out


# -- batches ----------------------------------------------------------------------------------------------------------
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(tokenizer, item: Prompt, where: str = "") -> tuple[list[int], list[int], list[int] | None]:
    """``(input_ids, targets, contrast)`` of one prompt: ``targets[t]`` is the token position ``t`` is scored on
    (``IGNORE`` elsewhere); ``contrast`` the incorrect answer's token at the scored position (contrast prompts)."""
    if item.answer is not None:
        prompt, full = _ids(tokenizer, item.prompt), _ids(tokenizer, item.prompt + item.answer)
        start = _common(prompt, full)
        if start == len(full):
            raise KnockoutError(f"{where}: the answer {item.answer!r} adds no token to the prompt")
        if start == 0:
            raise KnockoutError(f"{where}: the answer merges with the prompt's first token; end the prompt earlier")
        ids = full[:-1]  # the last answer token is a target only
        targets = [IGNORE] * len(ids)
        for t in range(start - 1, len(ids)):
            targets[t] = full[t + 1]
        return ids, targets, None
    a, b = _ids(tokenizer, item.prompt + item.correct), _ids(tokenizer, item.prompt + item.incorrect)
    start = _common(a, b)
    if start == min(len(a), len(b)):
        raise KnockoutError(
            f"{where}: the correct answer {item.correct!r} and the incorrect {item.incorrect!r} have no differing "
            "token (one tokenizes as the start of the other)"
        )
    if start == 0:
        raise KnockoutError(f"{where}: the answers differ at the first token; the prompt gives no context")
    ids = a[:start]
    targets, contrast = [IGNORE] * start, [IGNORE] * start
    targets[-1], contrast[-1] = a[start], b[start]
    return ids, targets, contrast


def check_length(item: Prompt, max_length: int, where: str = "") -> None:
    """Refuse, before tokenizing it, a prompt whose text (with its longer answer) has more characters than
    ``max_length`` tokens can hold (:data:`MAX_CHARS_PER_TOKEN` each): it could not be scored whole, and tokenizing
    a text of millions of characters takes gigabytes."""
    answers = [a for a in (item.answer, item.correct, item.incorrect) if a is not None]
    n = len(item.prompt) + max(map(len, answers), default=0)
    limit = max_length * MAX_CHARS_PER_TOKEN
    if n > limit:
        raise KnockoutError(
            f"{where} has {n:,} characters, more than --max-length {max_length} tokens can hold ({limit:,} "
            f"characters at {MAX_CHARS_PER_TOKEN} a token); shorten it or raise --max-length"
        )


def task_batches(tokenizer, items: Iterable[Prompt], batch_size: int, max_length: int, pad: int) -> list[Batch]:
    """Right-padded batches of ``items``, one document per prompt, with their scored targets (and the contrast
    tokens); ``keep`` names the positions holding scored targets. A prompt longer than ``max_length`` tokens is an
    error naming it (one with more characters than ``max_length`` tokens can hold is refused before it is tokenized:
    :func:`check_length`)."""
    if batch_size <= 0:
        raise KnockoutError(f"batch size must be positive, got {batch_size}")
    rows = []
    for i, item in enumerate(items):
        where = f"prompt {i} ({item.prompt[:40]!r}...)"
        check_length(item, max_length, where)
        ids, targets, contrast = encode(tokenizer, item, where)
        if len(ids) > max_length:
            raise KnockoutError(f"{where} has {len(ids)} input tokens, more than --max-length {max_length}")
        rows.append((ids, targets, contrast))
    if not rows:
        raise KnockoutError("the task has no evaluation prompts")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r[0]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        contrast = None if chunk[0][2] is None else torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for r, (seq, tg, ct) in enumerate(chunk):
            n = len(seq)
            ids[r, :n], targets[r, :n], mask[r, :n] = torch.tensor(seq), torch.tensor(tg), 1
            if contrast is not None:
                contrast[r, :n] = torch.tensor(ct)
        keep = torch.nonzero((targets != IGNORE).any(0)).flatten()
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), targets, contrast, keep))
    return batches


def encode_counterfactual(tokenizer, item: Prompt, where: str = "") -> list[int]:
    """The input ids of ``item``'s counterfactual run: its ``counterfactual`` encoded as :func:`encode` encodes the
    prompt, with the same answer(s), so that position ``t`` of the two runs holds the same role. Raises
    :class:`KnockoutError` when the prompt has no counterfactual or the two input lengths differ (patching pairs
    positions one to one)."""
    if item.counterfactual is None:
        raise KnockoutError(
            f"{where} has no counterfactual; counterfactual patching needs one per prompt (the ioi task, or a "
            'task .jsonl file with a "counterfactual" field on every line)'
        )
    ids = encode(tokenizer, item, where)[0]
    cf = encode(tokenizer, dataclasses.replace(item, prompt=item.counterfactual), f"the counterfactual of {where}")[0]
    if len(cf) != len(ids):
        raise KnockoutError(
            f"{where}: its counterfactual {item.counterfactual!r} has {len(cf)} input tokens but the prompt has "
            f"{len(ids)}; patching copies values position by position, so both must tokenize to the same length "
            "(use names or words of the same number of tokens)"
        )
    return cf


def counterfactual_batches(
    tokenizer, items: Iterable[Prompt], batch_size: int, max_length: int, pad: int
) -> list[Batch]:
    """The counterfactual runs of :func:`task_batches`' batches (the same arguments): batch ``i`` holds, row by row
    and position by position, the inputs of the counterfactuals of batch ``i``'s prompts (same shape, same attention
    mask), with nothing scored (``targets`` all ``IGNORE``). Raises :class:`KnockoutError` as
    :func:`encode_counterfactual` does, naming the first prompt that has no counterfactual or another length."""
    if batch_size <= 0:
        raise KnockoutError(f"batch size must be positive, got {batch_size}")
    rows = []
    for i, item in enumerate(items):
        where = f"prompt {i} ({item.prompt[:40]!r}...)"
        cf = encode_counterfactual(tokenizer, item, where)
        if len(cf) > max_length:
            raise KnockoutError(f"{where} has {len(cf)} input tokens, more than --max-length {max_length}")
        rows.append(cf)
    if not rows:
        raise KnockoutError("the task has no evaluation prompts")
    return padded_batches(rows, batch_size, pad, lambda seq: (torch.tensor(seq), torch.full((len(seq),), IGNORE)))


def eval_prompts(source: str, n: int) -> list[Prompt]:
    """The first ``n`` evaluation prompts of ``source`` (all of them when its evaluation part is smaller)."""
    out = []
    for item in prompts(source, "eval"):
        if len(out) == n:
            break
        out.append(item)
    return out

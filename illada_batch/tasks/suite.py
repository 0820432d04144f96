"""Few-shot text tasks whose answers a program can check exactly.

Each task is stated only in its *prefix* (an instruction plus worked examples);
every row prompt has the same shape, ``"Input: <items>\\nOutput:"``, so a model
has to read the prefix to know what to do.  The expected response is the answer
with a leading space (``" c b a"``), followed by EOS padding.

Text layout::

    Task: <instruction>\\n
    [Table:\\n<key> -> <value>\\n ...]        (substitute only)
    \\n
    Input: <items>\\nOutput: <answer>\\n\\n      (repeated until min_prefix_tokens)

Everything is deterministic given a ``random.Random``; nothing uses the global
random state.  As a Parquet file: ``python -m illada_batch.tasks.dataset`` (tasks/dataset.py).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

TASKS: tuple[str, ...] = ("reverse", "sort", "rotate", "double", "substitute")

# Short common words; none is a prefix of another (see tests).
WORDS: tuple[str, ...] = (
    "lamb", "king", "bread", "water", "stone", "fire", "tree", "gold",
    "light", "house", "horse", "river", "night", "door", "field", "wind",
    "cloud", "bird", "fish", "ship", "sword", "wine", "milk", "salt",
    "rain", "snow", "hand", "road", "wall", "moon", "star", "city",
    "boat", "cup", "bell", "seed", "oil", "book", "apple", "grass",
)
DIGITS: tuple[str, ...] = tuple("0123456789")

INSTRUCTIONS: dict[str, str] = {
    "reverse": "Write the same words in reverse order.",
    "sort": "Write the digits sorted from smallest to largest.",
    "rotate": "Move the first word to the end and keep the others in order.",
    "double": "Write every word twice in a row, keeping the order.",
    "substitute": "Replace every word by its value from the table below.",
}

TABLE_SIZE = 12
PROMPT_HEAD = "Input: "
PROMPT_TAIL = "\nOutput:"

CountTokens = Callable[[str], int]
_APPROX_RE = re.compile(r"\w+|[^\w\s]|\n")


def approx_tokens(text: str) -> int:
    """Cheap token-count stand-in: words, punctuation marks and newlines."""
    return len(_APPROX_RE.findall(text))


@dataclass(frozen=True)
class TaskRow:
    id: str
    task: str
    prefix_id: str
    prompt: str
    answer: str


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ----------------------------------------------------------------- answers
def solve(task: str, items: Sequence[str], table: Optional[dict] = None) -> list[str]:
    """The right output items for ``items`` (``table`` is needed for substitute)."""
    _check_task(task)
    items = list(items)
    if task == "reverse":
        return items[::-1]
    if task == "sort":
        return sorted(items, key=int)
    if task == "rotate":
        return items[1:] + items[:1]
    if task == "double":
        return [w for w in items for _ in range(2)]
    if table is None:
        raise ValueError("substitute needs the prefix's table")
    missing = [w for w in items if w not in table]
    if missing:
        raise ValueError(f"keys not in the table: {missing}")
    return [table[w] for w in items]


def _draw_items(task: str, state: dict, rng: random.Random) -> list[str]:
    if task == "sort":
        return [rng.choice(DIGITS) for _ in range(rng.randint(3, 6))]
    if task == "double":
        return [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
    if task == "substitute":
        return rng.sample(sorted(state["table"]), rng.randint(3, 5))
    return rng.sample(WORDS, rng.randint(3, 6))  # reverse, rotate: distinct words


def make_row(task: str, state: dict, rng: random.Random) -> tuple[str, str]:
    """One row for a prefix made by :func:`make_prefix`: ``(prompt, answer)``."""
    _check_task(task)
    items = _draw_items(task, state, rng)
    answer = solve(task, items, state.get("table"))
    return PROMPT_HEAD + " ".join(items) + PROMPT_TAIL, " " + " ".join(answer)


# ---------------------------------------------------------------- prefixes
def _make_table(rng: random.Random) -> dict[str, str]:
    keys = rng.sample(WORDS, TABLE_SIZE)
    while True:
        values = rng.sample(WORDS, TABLE_SIZE)
        if all(k != v for k, v in zip(keys, values)):
            return dict(zip(keys, values))


def _header(task: str, state: dict) -> str:
    text = f"Task: {INSTRUCTIONS[task]}\n"
    if task == "substitute":
        text += "Table:\n" + "".join(f"{k} -> {v}\n" for k, v in state["table"].items())
    return text + "\n"


def _example_text(prompt: str, answer: str) -> str:
    return prompt + answer + "\n\n"


def _build_prefix(task: str, rng: random.Random, min_prefix_tokens: int,
                  count_tokens: Optional[CountTokens]):
    """Header, worked examples and state of one prefix (at least one example)."""
    _check_task(task)
    count = count_tokens or approx_tokens
    state: dict = {"table": _make_table(rng)} if task == "substitute" else {}
    header = _header(task, state)
    examples: list[tuple[str, str]] = []
    # Sum of per-piece counts first (cheap), then confirm on the whole text,
    # since merges across piece boundaries can make the two differ slightly.
    total = count(header)
    while True:
        while total < min_prefix_tokens or not examples:
            examples.append(make_row(task, state, rng))
            total += count(_example_text(*examples[-1]))
        text = header + "".join(_example_text(p, a) for p, a in examples)
        total = count(text)
        if total >= min_prefix_tokens:
            return header, examples, state


def make_prefix(task: str, rng: random.Random, min_prefix_tokens: int,
                count_tokens: Optional[CountTokens] = None) -> tuple[str, dict]:
    """A prefix text of at least ``min_prefix_tokens`` tokens and its state.

    The state (the substitution table for ``substitute``, else empty) is what
    :func:`make_row` needs to make rows for this prefix.
    """
    header, examples, state = _build_prefix(task, rng, min_prefix_tokens, count_tokens)
    return header + "".join(_example_text(p, a) for p, a in examples), state


def parse_table(prefix: str) -> dict[str, str]:
    """The ``key -> value`` table of a substitute prefix."""
    table: dict[str, str] = {}
    lines = prefix.split("\n")
    try:
        start = lines.index("Table:") + 1
    except ValueError:
        raise ValueError("prefix has no 'Table:' section") from None
    for line in lines[start:]:
        if not line:
            break
        key, sep, value = line.partition(" -> ")
        if not sep:
            raise ValueError(f"bad table line {line!r}")
        table[key] = value
    return table


# ----------------------------------------------------------------- checking
def parse_prompt(prompt: str) -> list[str]:
    """The items of a row prompt ``"Input: <items>\\nOutput:"``."""
    if not (prompt.startswith(PROMPT_HEAD) and prompt.endswith(PROMPT_TAIL)):
        raise ValueError(f"not a row prompt: {prompt!r}")
    return prompt[len(PROMPT_HEAD):-len(PROMPT_TAIL)].split(" ")


def normalize(generated: str) -> str:
    """Strip, cut at the first newline (or special token ``<|``), strip again."""
    text = generated.strip().split("\n", 1)[0]
    return text.split("<|", 1)[0].strip()


def check(task: str, prefix: Optional[str], prompt: str, generated: str) -> bool:
    """Whether ``generated`` is exactly the right answer to ``prompt``.

    The right answer is recomputed from the prompt (and, for ``substitute``,
    from the table in ``prefix``).  Items must be separated by single spaces.
    """
    _check_task(task)
    if task == "substitute" and prefix is None:
        raise ValueError("substitute needs the prefix")
    items = parse_prompt(prompt)
    table = parse_table(prefix) if task == "substitute" else None
    return normalize(generated) == " ".join(solve(task, items, table))


# -------------------------------------------------------------------- suite
def make_suite(seed: int, rows_per_task: int, prefixes_per_task: int,
               min_prefix_tokens: int, count_tokens: Optional[CountTokens] = None,
               tasks: Sequence[str] = TASKS) -> tuple[dict[str, str], list[TaskRow]]:
    """Prefixes by prefix_id and rows; row ``i`` of a task uses prefix ``i % P``.

    Each task gets its own ``random.Random(f"{seed}:{task}")``, so a task's
    rows do not depend on which other tasks are included.
    """
    if prefixes_per_task < 1:
        raise ValueError("prefixes_per_task must be >= 1")
    prefixes: dict[str, str] = {}
    rows: list[TaskRow] = []
    for task in tasks:
        rng = random.Random(f"{seed}:{task}")
        states = []
        for j in range(prefixes_per_task):
            text, state = make_prefix(task, rng, min_prefix_tokens, count_tokens)
            prefixes[f"{task}-p{j}"] = text
            states.append(state)
        for i in range(rows_per_task):
            j = i % prefixes_per_task
            prompt, answer = make_row(task, states[j], rng)
            rows.append(TaskRow(f"{task}-{i:05d}", task, f"{task}-p{j}", prompt, answer))
    return prefixes, rows


def training_sequence(rng: random.Random, min_prefix_tokens: int,
                      count_tokens: Optional[CountTokens] = None,
                      task: Optional[str] = None) -> tuple[list[tuple[str, bool]], str]:
    """One training document as ``[(text, is_answer), ...]`` and its task.

    The document is a prefix (as :func:`make_prefix` makes it) followed by one
    more row; each answer text (``" c b a"``) is its own ``is_answer=True``
    segment, everything else is ``False``.  Joined, the segments equal
    ``prefix + prompt + answer``; the caller appends EOS.
    """
    task = rng.choice(TASKS) if task is None else task
    header, examples, state = _build_prefix(task, rng, min_prefix_tokens, count_tokens)
    segments: list[tuple[str, bool]] = [(header, False)]
    for prompt, answer in examples:
        segments += [(prompt, False), (answer, True), ("\n\n", False)]
    prompt, answer = make_row(task, state, rng)
    segments += [(prompt, False), (answer, True)]
    return segments, task

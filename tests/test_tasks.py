"""Tests for the few-shot task suite (illada_batch.tasks.suite)."""

import random
import re

import pytest

from illada_batch.tasks import dataset as D
from illada_batch.tasks import suite as T

PROMPT_RE = re.compile(r"^Input: [a-z0-9]+( [a-z0-9]+)*\nOutput:$")


@pytest.fixture(scope="module")
def suite():
    return T.make_suite(seed=7, rows_per_task=30, prefixes_per_task=3, min_prefix_tokens=150)


def rows_of(rows, task):
    return [r for r in rows if r.task == task]


def examples_in(prefix):
    """(prompt, answer) pairs of the worked examples in a prefix."""
    return [(f"Input: {a}\nOutput:", " " + b)
            for a, b in re.findall(r"Input: ([^\n]*)\nOutput: ([^\n]*)\n\n", prefix)]


def test_words_are_distinct_and_not_prefixes_of_each_other():
    assert 35 <= len(T.WORDS) == len(set(T.WORDS))
    for a in T.WORDS:
        assert a.isalpha() and a.islower()
        assert not any(b != a and b.startswith(a) for b in T.WORDS), a


def test_solve_examples():
    assert T.solve("reverse", "a b c".split()) == ["c", "b", "a"]
    assert T.solve("sort", "3 1 2 1".split()) == ["1", "1", "2", "3"]
    assert T.solve("rotate", "a b c".split()) == ["b", "c", "a"]
    assert T.solve("double", "cat dog".split()) == "cat cat dog dog".split()
    assert T.solve("substitute", ["x", "y"], {"x": "p", "y": "q"}) == ["p", "q"]


@pytest.mark.parametrize("task", T.TASKS)
def test_check_accepts_right_answers(suite, task):
    prefixes, rows = suite
    for r in rows_of(rows, task):
        prefix = prefixes[r.prefix_id]
        assert T.check(task, prefix, r.prompt, r.answer)
        assert T.check(task, prefix, r.prompt, r.answer.strip())
        assert T.check(task, prefix, r.prompt, r.answer + "\n\nInput: lamb king\nOutput: x")
        assert T.check(task, prefix, r.prompt, r.answer + "<|endoftext|><|endoftext|>")


@pytest.mark.parametrize("task", T.TASKS)
def test_check_rejects_wrong_answers(suite, task):
    prefixes, rows = suite
    n_wrong_order = 0
    for r in rows_of(rows, task):
        prefix = prefixes[r.prefix_id]
        items = r.answer.split()
        bad = [items[:-1], items[1:], items + [items[0]], items + ["lamb"],
               ["7"] + items, [], items[:1] * len(items) + ["0"]]
        if items[::-1] != items:
            bad.append(items[::-1])
            n_wrong_order += 1
        for b in bad:
            assert not T.check(task, prefix, r.prompt, " " + " ".join(b)), b
        assert not T.check(task, prefix, r.prompt, "  ".join(items))  # double spaces
        assert not T.check(task, prefix, r.prompt, "".join(items))
    assert n_wrong_order > 0


@pytest.mark.parametrize("task", T.TASKS)
def test_prefix_examples_are_correct(suite, task):
    prefixes, _ = suite
    for pid, prefix in prefixes.items():
        if not pid.startswith(task + "-"):
            continue
        assert prefix.startswith(f"Task: {T.INSTRUCTIONS[task]}\n")
        assert prefix.endswith("\n\n")
        ex = examples_in(prefix)
        assert ex and prefix.count("Input:") == len(ex)
        assert all(T.check(task, prefix, p, a) for p, a in ex)


def test_substitute_table_and_check_uses_prefix():
    rng = random.Random(0)
    prefix_a, state_a = T.make_prefix("substitute", rng, 50)
    table = state_a["table"]
    assert len(table) == 12 and len(set(table.values())) == 12
    assert all(k != v and k in T.WORDS and v in T.WORDS for k, v in table.items())
    assert T.parse_table(prefix_a) == table
    # A second prefix: same keys, values shifted, so every key maps elsewhere.
    keys = list(table)
    values = [table[k] for k in keys]
    table_b = dict(zip(keys, values[1:] + values[:1]))
    prefix_b = prefix_a.split("Table:\n")[0] + "Table:\n" + "".join(
        f"{k} -> {v}\n" for k, v in table_b.items()) + "\n"
    prompt, answer = T.make_row("substitute", state_a, rng)
    assert T.check("substitute", prefix_a, prompt, answer)
    assert not T.check("substitute", prefix_b, prompt, answer)
    right_b = " " + " ".join(table_b[k] for k in T.parse_prompt(prompt))
    assert T.check("substitute", prefix_b, prompt, right_b)
    with pytest.raises(ValueError):
        T.check("substitute", None, prompt, answer)


def test_substitute_tables_differ_between_prefixes(suite):
    prefixes, _ = suite
    tables = [T.parse_table(p) for k, p in prefixes.items() if k.startswith("substitute-")]
    assert len(tables) == 3 and tables[0] != tables[1] != tables[2]


def test_suite_deterministic_by_seed():
    a = T.make_suite(3, 10, 2, 100)
    assert a == T.make_suite(3, 10, 2, 100)
    b = T.make_suite(4, 10, 2, 100)
    assert a[0] != b[0] and a[1] != b[1]
    # A task's rows do not depend on which other tasks are in the suite.
    only_sort = T.make_suite(3, 10, 2, 100, tasks=("sort",))
    assert only_sort[1] == rows_of(a[1], "sort")


def test_suite_shape(suite):
    prefixes, rows = suite
    assert len(prefixes) == 3 * len(T.TASKS)
    assert len(rows) == 30 * len(T.TASKS)
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert r.prefix_id in prefixes and r.prefix_id.startswith(r.task + "-")


def ceil_count(text):
    """Not additive (pieces sum to more than the whole): exercises the recount."""
    return -(-len(text) // 50)


@pytest.mark.parametrize("count", [None, len, lambda s: len(s.split()), ceil_count])
@pytest.mark.parametrize("task", T.TASKS)
def test_prefix_reaches_min_tokens(task, count):
    for n in (1, 120, 400):
        prefix, _ = T.make_prefix(task, random.Random(n), n, count)
        assert (count or T.approx_tokens)(prefix) >= n
        assert examples_in(prefix)
    # and does not overshoot by more than one example
    prefix, _ = T.make_prefix(task, random.Random(1), 400)
    last = "".join(p + a + "\n\n" for p, a in examples_in(prefix)[-1:])
    assert T.approx_tokens(prefix[: len(prefix) - len(last)]) < 400


def test_task_not_inferable_from_prompt(suite):
    _, rows = suite
    names = set(T.TASKS) | {w.lower().strip(".") for s in T.INSTRUCTIONS.values()
                            for w in s.split()}
    for r in rows:
        assert PROMPT_RE.match(r.prompt), r.prompt
        assert not (set(T.parse_prompt(r.prompt)) & (names - set(T.WORDS)))
        assert r.answer.startswith(" ") and "\n" not in r.answer
    # Word tasks draw from the same vocabulary with overlapping lengths.
    word_tasks = [t for t in T.TASKS if t != "sort"]
    lengths = {t: {len(T.parse_prompt(r.prompt)) for r in rows_of(rows, t)} for t in word_tasks}
    assert set.intersection(*lengths.values())
    for t in word_tasks:
        assert all(w in T.WORDS for r in rows_of(rows, t) for w in T.parse_prompt(r.prompt))


@pytest.mark.parametrize("task", list(T.TASKS) + [None])
def test_training_sequence(task):
    rng = random.Random(5)
    segments, name = T.training_sequence(rng, 120, task=task)
    assert name in T.TASKS and (task is None or name == task)
    text = "".join(s for s, _ in segments)
    answers = [s for s, is_ans in segments if is_ans]
    assert segments[-1][1] and not segments[0][1]
    assert all(a.startswith(" ") and "\n" not in a for a in answers)
    prompt = segments[-2][0]
    prefix = text[: len(text) - len(prompt) - len(segments[-1][0])]
    assert prefix.startswith(f"Task: {T.INSTRUCTIONS[name]}\n")
    assert T.approx_tokens(prefix) >= 120
    ex = examples_in(prefix)
    assert [a for _, a in ex] + [segments[-1][0]] == answers
    assert T.check(name, prefix, prompt, segments[-1][0])
    assert all(T.check(name, prefix, p, a) for p, a in ex)
    # same as make_prefix + make_row given the same random state
    rng2 = random.Random(5)
    if task is None:
        rng2.choice(T.TASKS)
    p2, state = T.make_prefix(name, rng2, 120)
    assert p2 == prefix and T.make_row(name, state, rng2) == (prompt, segments[-1][0])


def test_write_parquet_round_trip(tmp_path, suite):
    import pyarrow.parquet as pq

    prefixes, rows = suite
    path = tmp_path / "suite.parquet"
    D.write_parquet(str(path), prefixes, rows)
    table = pq.read_table(path)
    assert table.column_names == list(D.COLUMNS)
    assert all(str(f.type) == "string" for f in table.schema)
    assert D.read_parquet(str(path)) == (prefixes, rows)
    first = table.slice(0, 1).to_pylist()[0]
    assert first["prefix"] == prefixes[rows[0].prefix_id] and first["answer"] == rows[0].answer


def test_cli(tmp_path):
    out = tmp_path / "d.parquet"
    D.main(["--out", str(out), "--seed", "1", "--rows-per-task", "4",
            "--prefixes-per-task", "2", "--min-prefix-tokens", "60"])
    prefixes, rows = D.read_parquet(str(out))
    assert len(rows) == 4 * len(T.TASKS) and len(prefixes) == 2 * len(T.TASKS)
    assert (prefixes, rows) == T.make_suite(1, 4, 2, 60)


def test_unknown_task_and_bad_prompt():
    with pytest.raises(ValueError):
        T.make_prefix("nope", random.Random(0), 10)
    with pytest.raises(ValueError):
        T.check("reverse", None, "lamb king", " king lamb")

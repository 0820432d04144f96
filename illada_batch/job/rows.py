"""Row rendering and checking: input rows -> engine requests, results -> output rows.

A bad row (null, empty or non-string prompt, undecodable bytes, an id that is null, neither
text nor an integer, or a duplicate (ids compare by their text: ``ids.py``), a template
variable it lacks, too long for the model) becomes an output row with ``error`` set and no
generation; it never fails its shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from illada_batch.decoding.special_text import special_problem
from illada_batch.decoding.template import ResponseTemplate
from illada_batch.job.ids import RowId, canonical_id, decoded
from illada_batch.job.spec import JobSpec

OUTPUT_SCHEMA = pa.schema([  # after ``id``: the id's text (``ids.py``), a string whatever the input's type
    ("sample_index", pa.int32()), ("prompt", pa.string()), ("generation", pa.string()),
    ("num_tokens", pa.int32()), ("steps", pa.int32()), ("finish_reason", pa.string()), ("seed", pa.int64()),
    ("error", pa.string()), ("backend", pa.string()), ("model", pa.string()),
])


@dataclass
class RenderedRow:
    row_id: RowId | None  # the id's text (``ids.py``); None when the row has none (its error says why)
    prompt: str | None  # the row's text after the template (without the shared prefix)
    error: str | None
    response: ResponseTemplate | None = None  # the row's response template, its columns filled in


def _text(value, field: str) -> tuple[str | None, str | None]:
    value, error = decoded(value, field)
    if error is not None:
        return None, error
    if not isinstance(value, str):
        return None, f"{field} is {type(value).__name__}, expected a string"
    if not value.strip():
        return None, f"{field} is empty"
    return value, None


def render_rows(spec: JobSpec, table: pa.Table, chat_wrap=None,
                duplicates: tuple[tuple[int, str], ...] = (), specials: tuple[str, ...] = ()) -> list[RenderedRow]:
    """Apply the template to each row; ``chat_wrap(user_text) -> str`` wraps chat turns.
    ``duplicates``: (row offset, where its id was first seen) for ids an earlier shard has.
    ``specials``: the tokenizer's special token texts, which no row value may hold."""
    inp = spec.input
    ids = table.column(inp.id_column).to_pylist()
    source = inp.messages_column or inp.prompt_column
    values = table.column(source).to_pylist()
    response = ResponseTemplate.parse(spec.response_template) if spec.response_template else None
    used = spec.template_columns() | set(response.columns if response is not None else ())
    variables = {v: table.column(v).to_pylist() for v in inp.variables if v in used}
    seen: dict = {}
    earlier = dict(duplicates)
    out = []
    for i, (raw_id, value) in enumerate(zip(ids, values)):
        prompt, filled = None, None
        row_id, error = canonical_id(raw_id, inp.id_column)
        if error is None and i in earlier:
            error = f"duplicate id {row_id!r} (first seen at {earlier[i]})"
        elif error is None and row_id in seen:
            error = f"duplicate id {row_id!r} (first seen at row {seen[row_id]} of this shard)"
        elif error is None:
            seen[row_id] = i
        if error is None:
            row = {k: v[i] for k, v in variables.items()}
            try:
                prompt, filled, error = _render_row(spec, source, value, row, response, chat_wrap, specials)
            except Exception as exc:  # noqa: BLE001 - nothing one row holds may fail its shard
                error = f"cannot render the row: {type(exc).__name__}: {exc}"
        out.append(RenderedRow(row_id, prompt if error is None else None, error, filled if error is None else None))
    return out


def _render_row(spec: JobSpec, source: str, value, variables: dict, response: ResponseTemplate | None, chat_wrap,
                specials: tuple[str, ...]) -> tuple[str | None, ResponseTemplate | None, str | None]:
    """(prompt, filled response template, error) of one row whose id is fine."""
    for column, v in variables.items():
        variables[column], error = _variable(v, column, specials)
        if error is not None:
            return None, None, error
    if spec.input.messages_column:
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
            return None, None, f"{source} must be a non-empty list of {{role, content}} messages"
        for k, m in enumerate(value):
            problem = special_problem(f"{source} message {k}", m["content"], specials)
            if problem:
                return None, None, problem
        prompt = chat_wrap(value) if chat_wrap else "\n".join(m["content"] for m in value)
        text = None
    else:
        text, error = _text(value, source)
        if error is None:
            error = special_problem(source, text, specials)
        if error is not None:
            return None, None, error
        try:
            prompt = spec.template.format(prompt=text, **variables)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            return None, None, f"template: {type(exc).__name__}: {exc}"
        error = special_problem("template (rendered)", prompt, specials)
        if error is not None:
            return None, None, error
        if chat_wrap:
            prompt = chat_wrap([{"role": "user", "content": prompt}])
    filled = None
    if response is not None:
        filled = response.render({"prompt": text, **variables})
        error = special_problem("response_template (rendered)", "".join(p for p in filled.pieces if isinstance(p, str)),
                                specials)
        if error is not None:
            return None, None, error
    return prompt, filled, None


def _variable(value, column: str, specials: tuple[str, ...]):
    """(value, error) of a template variable: null is an error (never the text "None"),
    bytes are UTF-8 text, text holding special token text is an error."""
    value, error = decoded(value, column)
    if error is not None:
        return None, error
    if isinstance(value, str):
        return value, special_problem(column, value, specials)
    return value, None


def output_table(spec: JobSpec, table: pa.Table, rows: list[RenderedRow], results: dict, model_name: str) -> pa.Table:
    """One output row per (row, sample): ``results[(i, j)]`` is an engine Result or None for bad rows."""
    n = spec.n
    cols: dict[str, list] = {name: [] for name in ["id", *OUTPUT_SCHEMA.names]}
    passthrough = {c: table.column(c).to_pylist() for c in spec.input.passthrough}
    take, slots = [], []
    for i, row in enumerate(rows):
        for j in range(n):
            r = results.get((i, j))
            take.append(i)
            cols["id"].append(row.row_id)
            cols["sample_index"].append(j)
            cols["prompt"].append(row.prompt)
            error = row.error or (r.error if r is not None else None)
            ok = error is None and r is not None
            cols["generation"].append(r.text if ok else None)
            slots.append(r.slots if ok else None)
            cols["num_tokens"].append(len(r.token_ids) if ok else 0)
            cols["steps"].append(r.steps if r is not None else 0)
            cols["finish_reason"].append(r.finish_reason if ok else "error")
            cols["seed"].append(r.seed if r is not None else None)
            cols["error"].append(error)
            cols["backend"].append(spec.backend)
            cols["model"].append(model_name)
    arrays = [pa.array(cols["id"], type=pa.string())] + [pa.array(cols[f.name], type=f.type) for f in OUTPUT_SCHEMA]
    names = ["id", *OUTPUT_SCHEMA.names]
    if spec.response_template is not None:  # each slot's text, so nobody parses `generation` back
        arrays.append(pa.array(slots, type=pa.list_(pa.string())))
        names.append("slots")
    for c, values in passthrough.items():
        arrays.append(pa.array([values[i] for i in take], type=table.schema.field(c).type))
        names.append(c)
    return pa.Table.from_arrays(arrays, names=names)

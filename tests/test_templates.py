"""Response templates: fixed text with masked slots.

The template's parsing and layout (pure); the decoding loop with a template in the batch
(random tiny models: fixed text never changes at any step, transfer counts come from each
row's masked positions, a block with nothing masked costs no step, early stop per slot); the
engine on the shipped model in every cache mode (the reverse task's answer in a slot between
fixed text); the job's spec checks, rows and ``slots`` column.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from illada_batch.decoding.loop import DecodeBatch, denoise_step, end_slots_at_eos, row_generators
from illada_batch.decoding.params import CacheMode, SamplingParams
from illada_batch.decoding.template import Column, ResponseTemplate
from illada_batch.errors import ParamsError, SpecError
from illada_batch.job.spec import spec_from_dict

MASK, EOS = 95, 1  # the TINY config's ids


# --- the template ---------------------------------------------------------------------


def test_parse_keeps_every_other_brace_as_text():
    t = ResponseTemplate.parse('{"name": "{slot:8}", "age": {slot:3}, "topic": "{topic}"}')
    assert t.pieces == ('{"name": "', 8, '", "age": ', 3, ', "topic": "', Column("topic"), '"}')
    assert t.slot_sizes == [8, 3] and t.columns == ["topic"]
    filled = t.render({"topic": "bread"})
    tok = filled.tokenize(lambda s: [ord(c) for c in s])
    assert tok.texts == ('{"name": "', '", "age": ', ', "topic": "bread"}')
    assert tok.length == sum(map(len, tok.texts)) + 11
    with pytest.raises(ParamsError, match="no {slot:N}"):
        ResponseTemplate.parse("fixed text only {topic}")
    with pytest.raises(ParamsError, match="at least 1 token"):
        ResponseTemplate.parse("a {slot:0}")


def test_layout_and_read_write_the_fixed_text_as_given():
    tok = ResponseTemplate.parse("<{slot:3}|{slot:2}>").tokenize(lambda s: [ord(c) for c in s])
    ids, slot = tok.layout(10, MASK, EOS)
    assert ids == [ord("<"), MASK, MASK, MASK, ord("|"), MASK, MASK, ord(">"), EOS, EOS]
    assert slot == [-1, 0, 0, 0, -1, 1, 1, -1, -1, -1]
    response = [ord("<"), 60, EOS, 61, ord("|"), 62, 63, ord(">"), EOS, EOS]  # slot 0 ends at its EOS
    text, slots, written, stopped = tok.read(response, EOS, lambda t: "".join(chr(c) for c in t))
    assert (text, slots, stopped) == ("<<|>?>", ["<", ">?"], True)
    assert written == [ord("<"), 60, ord("|"), 62, 63, ord(">")]
    with pytest.raises(RuntimeError, match="changed a response template's fixed text at positions \\[4\\]"):
        tok.read(response[:4] + [70] + response[5:], EOS, chr)


def test_early_stop_ends_each_slot_at_its_eos_and_never_touches_fixed_text():
    M, E = MASK, EOS
    slot = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, 1, -1], [0] * 9])
    resp = torch.tensor([[5, 7, E, 8, E, M, E, M, 9],  # slot 0 settled: 8 -> EOS; slot 1 has a mask before its EOS
                         [7, 8, E, M, 9, M, M, M, M]])  # no template: one slot, ends at its first EOS
    out = end_slots_at_eos(resp, slot, M, E)
    assert out.tolist() == [[5, 7, E, E, E, M, E, M, 9], [7, 8, E, E, E, E, E, E, E]]


# --- the decoding loop ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model(make_tiny_llada):
    return make_tiny_llada()


def run_rows(model, params, responses, prompts=None, seeds=None):
    """Decode a batch to the end; returns (batch, each step's response [B, G])."""
    prompts = prompts or [[5, 6, 7, 8, 9][: 3 + i % 3] for i in range(len(responses))]
    gens = row_generators(seeds or list(range(len(responses))), model.device)
    batch = DecodeBatch.from_prompts(prompts, params, MASK, 0, gens, model.device, responses=responses)
    history = [batch.x[:, -params.gen_length:].clone()]
    while not bool(batch.done.all()):
        denoise_step(model, batch, params)
        history.append(batch.x[:, -params.gen_length:].clone())
    return batch, history


def layout(text_ids: list, slots: list[int], G: int):
    """A token template: fixed runs (lists of ids) around slots."""
    from illada_batch.decoding.template import TokenTemplate

    return TokenTemplate(tuple("x" * len(f) for f in text_ids), tuple(tuple(f) for f in text_ids), tuple(slots)).layout(
        G, MASK, EOS)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_fixed_text_never_changes_and_only_slots_are_filled(model, threshold):
    params = SamplingParams(steps=8, gen_length=16, block_length=8, early_stop=False, threshold=threshold)
    templated = layout([[10, 11], [12], [13, 14, 15]], [3, 5], 16)  # 8 fixed + 8 slot positions
    batch, history = run_rows(model, params, [templated, None, templated])
    fixed = torch.tensor(templated[1]) < 0  # [G]: fixed text and the EOS tail
    want = torch.tensor(templated[0])
    for resp in history:  # at every step
        assert torch.equal(resp[0][fixed], want[fixed]) and torch.equal(resp[2][fixed], want[fixed])
    final = history[-1]
    assert not (final == MASK).any(), "every slot position is filled"
    assert not torch.equal(final[0][~fixed], final[2][~fixed]), "rows with different prompts fill differently"


def test_transfer_counts_come_from_the_rows_masked_positions(model):
    """A block with m masked positions in s steps unmasks the reference schedule of m (m // s,
    one more for the first m % s steps), a fully masked row beside it the schedule of the
    block length; a block with nothing masked costs no step."""
    params = SamplingParams(steps=12, gen_length=24, block_length=8, early_stop=False)  # 3 blocks, 4 steps each
    # block 0: 3 fixed + 5 masked; block 1: all fixed; block 2: 3 fixed + 2 masked + 3 of EOS tail
    templated = layout([[20, 21, 22], list(range(30, 41)), []], [5, 2], 24)
    batch, history = run_rows(model, params, [templated, None])
    unmasked = [int(((a == MASK) & (b != MASK))[0].sum()) for a, b in zip(history, history[1:])]
    plain = [int(((a == MASK) & (b != MASK))[1].sum()) for a, b in zip(history, history[1:])]
    assert unmasked[:6] == [2, 1, 1, 1, 1, 1], unmasked  # 5 in 4 steps; then 2 in 4 steps: one a step
    assert batch.nfe.tolist() == [6, 12], "block 1 (nothing masked) is skipped; block 2 needs 2 steps"
    assert plain == [2] * 12


# --- the engine on the shipped model ----------------------------------------------------


@pytest.fixture(scope="module")
def suite():
    from illada_batch.engine.diffusion import Engine
    from illada_batch.tasks.evaluate import suite_rows

    engine = Engine.from_pretrained("tiny-llada", cache="off", max_batch_size=8)
    prefixes, rows = suite_rows(engine.tokenizer, 10_000, 8, 1, 400, task_names=("reverse",))
    return engine.model, prefixes, rows


@pytest.mark.parametrize("cache", [m.value for m in CacheMode.concrete()])
def test_the_reverse_tasks_answer_in_a_slot_in_every_cache_mode(suite, cache):
    from illada_batch.engine.diffusion import Engine
    from illada_batch.tasks import suite as tasks

    model, prefixes, rows = suite
    engine = Engine(model, cache=cache, max_batch_size=8)
    prefix = prefixes[rows[0].prefix_id]
    params = SamplingParams(steps=8, gen_length=16, block_length=8, temperature=0.5)
    results = engine.generate([r.prompt for r in rows], params, prefix=prefix, n=2, seed=3,
                              request_ids=[r.id for r in rows], response_template="{slot:8} END")
    assert len(results) == 2 * len(rows)
    for res in results:
        assert res.error is None and len(res.slots) == 1
        assert res.text == res.slots[0] + " END", "the fixed text, byte for byte, after the slot"
        assert "[MASK]" not in res.text and res.steps <= 8
    right = sum(tasks.check("reverse", prefix, r.prompt, res.slots[0]) for r, res in zip(
        [r for r in rows for _ in range(2)], results))
    assert right >= 14, f"{right} of 16 answers right in the slot"  # 16 of 16 in every mode when written
    again = engine.generate([rows[3].prompt], params, prefix=prefix, n=2, seed=3, request_ids=[rows[3].id],
                            response_template="{slot:8} END")
    assert [r.slots for r in again] == [r.slots for r in results[6:8]], "a sample's seed, not its batch, decides"


def test_engine_refuses_a_template_without_a_slot_or_too_long(suite):
    from illada_batch.engine.diffusion import Engine

    engine = Engine(suite[0], cache="off")
    params = SamplingParams(steps=8, gen_length=8, block_length=8)
    with pytest.raises(ParamsError, match="response_template: no {slot:N}"):
        engine.generate(["Input: lamb\nOutput:"], params, response_template="fixed")
    with pytest.raises(ParamsError, match=r"response_template: \d+ tokens > gen_length 8"):
        engine.generate(["Input: lamb\nOutput:"], params, response_template="{slot:8} END X")


# --- the job --------------------------------------------------------------------------


def job(tmp_path, **extra) -> dict:
    return {"name": "slots", "input": {"url": str(tmp_path / "in.parquet"), "variables": ["topic"]},
            "sampling": {"steps": 8, "gen_length": 16, "block_length": 8}, "output": {"url": str(tmp_path / "out")},
            "prefix": {"text": "Task: Write the same words in reverse order.\n\nInput: lamb king bread\n"
                               "Output: bread king lamb\n\n"}, **extra}


@pytest.mark.parametrize("template, words", [
    ("fixed text only", "response_template: no {slot:N}"),
    ("{slot:10} and {slot:7}", "response_template: its slots hold 17 tokens > sampling.gen_length 16"),
    ("{slot:4} {colour}", "response_template: {colour} is not a row column here (known: prompt, topic"),
])
def test_the_spec_refuses_a_bad_template_naming_the_field(tmp_path, template, words):
    with pytest.raises(SpecError, match=words.replace("{", "\\{").replace("(", "\\(")):
        spec_from_dict(job(tmp_path, response_template=template))


def test_a_job_writes_the_rendered_response_and_each_slots_text(tmp_path):
    from illada_batch.job.replica import ShardReplica
    from illada_batch.job.shards import plan_shards

    prompts = ["Input: stone sword apple\nOutput:", "Input: fire gold\nOutput:", "Input: tree\nOutput:"]
    topics = ["a", "b", "c " * 20]  # the last one's rendered template is longer than gen_length: an error row
    pq.write_table(pa.table({"id": ["r0", "r1", "r2"], "prompt": prompts, "topic": topics}), tmp_path / "in.parquet")
    spec = spec_from_dict(job(tmp_path, response_template="{slot:6} ({topic})", n=2)).resolved()
    assert spec.fingerprint() != spec_from_dict(job(tmp_path, n=2)).resolved().fingerprint()
    replica = ShardReplica(spec.model_dump_json(), str(tmp_path / "out"), spec.fingerprint())
    (shard,), _ = plan_shards(spec.input.url, {}, 64, spec.input.columns())
    manifest = replica.process(shard.to_dict())
    rows = {(r["id"], r["sample_index"]): r for r in pq.read_table(tmp_path / "out" / manifest.data_key).to_pylist()}
    assert len(rows) == 6
    for j in (0, 1):
        assert rows[("r0", j)]["slots"] == [" apple sword stone"]
        assert rows[("r0", j)]["generation"] == " apple sword stone (a)"
        assert rows[("r1", j)]["generation"] == rows[("r1", j)]["slots"][0] + " (b)"
        bad = rows[("r2", j)]
        assert bad["generation"] is None and bad["slots"] is None
        assert bad["error"].startswith("response template: ") and "> gen_length 16" in bad["error"]


@pytest.mark.slow
def test_a_job_with_slots_on_local_ray_and_the_s3_server(s3, ray_cluster):
    from pipeline_support import assert_exactly_once, job_dict, read_output

    from illada_batch.job.driver import run_job

    fs = s3.fs()
    words = "lamb king bread water stone fire tree gold light house".split()
    ids = [f"s{i:02d}" for i in range(10)]
    prompts = [f"Input: {words[i]} {words[(i + 3) % 10]} {words[(i + 7) % 10]}\nOutput:" for i in range(10)]
    with fs.open("bucket/slots-in/p.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), f)
    spec = spec_from_dict(job_dict("s3://bucket/slots-in/", "s3://bucket/slots-out", s3, n=2, shard_rows=4,
                                   response_template="{slot:6} END", sampling={"steps": 8, "gen_length": 16,
                                                                              "block_length": 8}))
    logs: list[str] = []
    report = run_job(spec, show_progress=False, log=logs.append)
    table = read_output(fs, "bucket/slots-out")
    assert report.ok, table.column("error").to_pylist()[:2]  # " END" is 3 tokens: 6 + 3 > 8 would be error rows
    assert_exactly_once(table, ids, n=2)
    rows = table.to_pylist()
    assert all(r["generation"] == r["slots"][0] + " END" for r in rows)
    want = {p: " " + " ".join(reversed(p.split("\n")[0].removeprefix("Input: ").split())) for p in prompts}
    right = sum(r["slots"][0] == want[r["prompt"]] for r in rows)
    assert right >= 12, f"{right} of 20 slots hold the reversed words"  # 14 when written (a one-example prefix)


# --- what one row holds never fails its shard -------------------------------------------


@pytest.mark.parametrize("marker", ["{slot: 3}", "{Slot:3}", "{slot:}", "{slot:x}", "{ slot:3 }", "{SLOT:2}"])
def test_a_near_miss_slot_marker_is_refused_naming_it(tmp_path, marker):
    with pytest.raises(ParamsError, match=f"{re.escape(marker)} is not a slot marker"):
        ResponseTemplate.parse(f"{{slot:4}} and {marker}")
    with pytest.raises(SpecError, match=f"response_template: {re.escape(marker)} is not a slot marker"):
        spec_from_dict(job(tmp_path, response_template=f"{{slot:4}} {marker}"))


SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>")
texts = st.one_of(st.none(), st.text(alphabet="ab <|>{}N", max_size=6),
                  st.sampled_from(SPECIALS).map(lambda s: f"x{s}y"))
columns = {  # the topic column's Arrow type -> its values (null among them)
    pa.string(): texts,
    pa.int64(): st.one_of(st.none(), st.integers(-5, 5)),
    pa.binary(): st.one_of(st.none(), st.binary(max_size=3), st.sampled_from(SPECIALS).map(str.encode)),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(texts, min_size=1, max_size=6), kind=st.sampled_from(list(columns)), data=st.data())
def test_each_row_renders_or_is_an_error_row_naming_its_column(tmp_path, prompts, kind, data):
    """Whatever a row's prompt and template variable hold (null, numbers, bytes, special
    token text, braces), it renders to exactly its values' text, in `template` and
    `response_template` alike, or becomes an error row naming the column; the text "None"
    never stands in for a null."""
    from illada_batch.job.rows import render_rows

    topics = data.draw(st.lists(columns[kind], min_size=len(prompts), max_size=len(prompts)))
    spec = spec_from_dict(job(tmp_path, template="{prompt} on {topic}", response_template="{slot:4} ({topic})"))
    table = pa.table({"id": [f"r{i}" for i in range(len(prompts))], "prompt": pa.array(prompts, pa.string()),
                      "topic": pa.array(topics, kind)})
    rows = render_rows(spec, table, specials=SPECIALS)
    assert len(rows) == len(prompts)
    for row, prompt, topic in zip(rows, prompts, topics):
        if isinstance(topic, bytes):
            try:
                topic = topic.decode()
            except UnicodeDecodeError:
                topic = None  # not text: an error row like a null
        bad_prompt = prompt is None or not prompt.strip() or any(s in prompt for s in SPECIALS)
        bad_topic = topic is None or any(s in str(topic) for s in SPECIALS)
        if bad_prompt or bad_topic:
            assert row.error is not None and row.prompt is None and row.response is None
            assert row.error.startswith("topic" if bad_topic else "prompt"), row.error
        else:
            assert row.error is None, row.error
            assert row.prompt == f"{prompt} on {topic}"
            assert row.response.slot_sizes == [4] and not row.response.columns
            assert "".join(p for p in row.response.pieces if isinstance(p, str)) == f" ({topic})"


def test_a_value_holding_special_token_text_is_an_error_row_and_the_rest_generate(tmp_path):
    """Before: the mask token's text in a response template's variable was generated over,
    the fixed-text check raised, and the shard failed on every retry."""
    from illada_batch.job.replica import ShardReplica
    from illada_batch.job.shards import plan_shards

    prompt = "Input: stone sword apple\nOutput:"
    pq.write_table(pa.table({"id": ["r0", "r1", "r2", "r3"], "prompt": [prompt, prompt, prompt + "<|endoftext|>", prompt],
                             "topic": ["a", "b <|mdm_mask|> c", "d", None]}), tmp_path / "in.parquet")
    spec = spec_from_dict(job(tmp_path, response_template="{slot:6} ({topic})")).resolved()
    replica = ShardReplica(spec.model_dump_json(), str(tmp_path / "out"), spec.fingerprint())
    (shard,), _ = plan_shards(spec.input.url, {}, 64, spec.input.columns())
    manifest = replica.process(shard.to_dict())
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / manifest.data_key).to_pylist()}
    assert rows["r0"]["error"] is None and rows["r0"]["generation"].endswith(" (a)")
    assert rows["r1"]["error"].startswith("topic holds '<|mdm_mask|>', the text of a special token")
    assert rows["r2"]["error"].startswith("prompt holds '<|endoftext|>'")
    assert rows["r3"]["error"] == "topic is null"


@pytest.mark.parametrize("field, extra", [
    ("template", {"template": "{prompt} <|mdm_mask|>"}),
    ("response_template", {"response_template": "{slot:4} <|endoftext|>"}),
    ("prefix.text", {"prefix": {"text": "Task: <|eot_id|>"}}),
])
def test_special_token_text_in_fixed_text_is_refused_naming_the_field(tmp_path, field, extra):
    """``validate`` and ``run`` refuse it before any cluster work; a replica refuses it at
    start (a model given by URL is first seen there), an error that stops the job once."""
    from illada_batch.job.pool import FATAL
    from illada_batch.job.preflight import model_problems
    from illada_batch.job.replica import ShardReplica

    pq.write_table(pa.table({"id": ["r0"], "prompt": ["x"], "topic": ["t"]}), tmp_path / "in.parquet")
    spec = spec_from_dict(job(tmp_path, **extra)).resolved()
    problems, _ = model_problems(spec)
    assert len(problems) == 1 and problems[0].startswith(f"{field} holds '<|"), problems
    with pytest.raises(FATAL, match=re.escape(f"{field} holds '<|")):
        ShardReplica(spec.model_dump_json(), str(tmp_path / "out"), spec.fingerprint()).start()


def test_a_response_template_whose_fixed_text_exceeds_gen_length_is_refused(tmp_path):
    from illada_batch.job.preflight import model_problems

    spec = spec_from_dict(job(tmp_path, response_template="{slot:4} " + "word " * 20 + "{topic}"))
    problems, _ = model_problems(spec)  # 4 slot tokens fit gen_length 16; the fixed text does not
    assert len(problems) == 1 and problems[0].startswith("response_template: its fixed text is "), problems
    assert "> sampling.gen_length 16" in problems[0]
    assert model_problems(spec_from_dict(job(tmp_path, response_template="{slot:4} ({topic})")))[0] == []


def test_the_engine_makes_fixed_text_holding_the_mask_token_an_error_result(suite):
    from illada_batch.decoding.template import TokenTemplate
    from illada_batch.engine.diffusion import Engine
    from illada_batch.engine.requests import Request

    engine = Engine(suite[0], cache="off")
    params = SamplingParams(steps=8, gen_length=8, block_length=8)
    mask = suite[0].config.mask_token_id
    bad = TokenTemplate(("<", ">"), ((5, mask), (6,)), (3,))
    good = TokenTemplate(("<", ">"), ((5,), (6,)), (3,))
    results = engine.run([Request("a", (7, 8), (), params, 0, 0, bad), Request("b", (7, 8), (), params, 0, 0, good)])
    assert results[0].error.startswith("response template: its fixed text holds the mask token")
    assert results[1].error is None and results[1].token_ids[0] == 5
    with pytest.raises(ParamsError, match="response_template: its fixed text holds '<\\|mdm_mask\\|>'"):
        engine.generate(["x"], params, response_template="{slot:3} <|mdm_mask|>")
    with pytest.raises(ParamsError, match="response_template: {prompt} is a row column"):
        engine.generate(["x"], params, response_template="{prompt} {slot:3}")

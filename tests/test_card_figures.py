"""The dataset card shows plots of the run (issue 20, item 4): PNGs under the output's
``_card/``, linked from the card with relative paths, counted as the job's own files, and
never written over a file of the user's."""

from __future__ import annotations

import json
import re
from collections import Counter
from types import SimpleNamespace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pipeline_support import job_dict, write_prompts

from illada_batch.job.card_counts import card_counts, column_counts, error_cause
from illada_batch.job.commit import CARD_MARK, Output
from illada_batch.job.driver import run_job
from illada_batch.job.records import RowRange, ShardStats
from illada_batch.job.spec import spec_from_dict

FS = fsspec.filesystem("file")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_finished_jobs_card_links_its_plots_and_a_rerun_keeps_them(ray_cluster, tmp_path):
    """A small job with error rows (a repeated id, an empty prompt), n=2: the card links a
    valid PNG for throughput, lengths, finish reasons and errors; a re-run over the output
    takes them as the job's own files."""
    import matplotlib.image

    ids = [f"r{i:02d}" for i in range(10)] + ["r00"]
    prompts = ["Input: lamb king bread\nOutput:"] * 10 + [""]
    prompts[3] = ""
    (tmp_path / "in").mkdir()
    write_prompts(FS, str(tmp_path / "in" / "a.parquet"), ids, prompts, row_group_size=4)
    spec = spec_from_dict(job_dict(str(tmp_path / "in"), str(tmp_path / "out"), None, n=2, shard_rows=4,
                                   error_budget=1.0, sampling__steps=2, sampling__gen_length=4,
                                   sampling__block_length=2))
    for _ in range(2):
        logs: list[str] = []
        assert run_job(spec, show_progress=False, log=logs.append).exit_code() == 0, logs
        text = (tmp_path / "out" / "README.md").read_text()
        assert text.rstrip().splitlines()[-1] == CARD_MARK, "the mark stays the card's last line"
        links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
        assert sorted(links) == [f"_card/{n}.png" for n in ("errors", "finish_reasons", "lengths", "throughput")]
        for link in links:
            body = (tmp_path / "out" / link).read_bytes()
            assert body.startswith(PNG_SIGNATURE), link
            assert matplotlib.image.imread(tmp_path / "out" / link).ndim == 3, link
        assert Output(FS, str(tmp_path / "out")).foreign_files({}) == []


def test_a_users_png_in_the_card_folder_is_never_written_over(tmp_path):
    """A PNG the job did not draw is a foreign file, and writing the plots leaves it as it was
    (the card does not link it); a plot the job drew is written over."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from illada_batch.job.figures import PNG_MARK

    (tmp_path / "_card").mkdir()
    users = (tmp_path / "_card" / "lengths.png")
    Figure().savefig(users, format="png")  # a real PNG, without the job's mark
    before = users.read_bytes()
    out = Output(FS, str(tmp_path))
    assert out.foreign_files({}) == ["_card/lengths.png"]
    ours = {"throughput.png": ("Throughput", PNG_SIGNATURE + PNG_MARK.encode()),
            "lengths.png": ("Lengths", PNG_SIGNATURE + PNG_MARK.encode())}
    assert out.write_figures(ours) == [("Throughput", "_card/throughput.png")]
    assert users.read_bytes() == before
    assert out.write_figures(ours) == [("Throughput", "_card/throughput.png")], "its own plot is written over"


@given(value=st.text(max_size=20), row=st.integers(0, 10**9),
       file=st.text(st.characters(blacklist_characters="()"), max_size=20))
def test_a_causes_values_do_not_make_it_another_cause(value, row, file):
    """Error rows by cause: the ids, rows and files an error names fold into one cause, so the
    causes stay few whatever the rows hold."""
    assert error_cause(f"duplicate id {value!r} (first seen at row {row} of {file})") == "duplicate id …"
    assert error_cause(f"cannot render the row: KeyError: {value!r}") == "cannot render the row"


_rows = st.lists(st.tuples(st.none() | st.integers(0, 40), st.none() | st.sampled_from(["eos", "length", "error"]),
                           st.none() | st.sampled_from(["duplicate id 'a'", "empty prompt", "too long: 9 tokens"])),
                 max_size=30)


def _table(rows) -> pa.Table:
    tokens, reasons, errors = (list(c) for c in zip(*rows)) if rows else ([], [], [])
    return pa.table({"num_tokens": pa.array(tokens, pa.int32()), "finish_reason": pa.array(reasons, pa.string()),
                     "error": pa.array(errors, pa.string())})


def _loop_counts(files) -> tuple[Counter, Counter, Counter]:
    """The counts by a plain loop over every row."""
    rows = [r for f in files for r in f]
    return (Counter(t for t, _, e in rows if e is None and t is not None),
            Counter("none" if r is None else r for _, r, _ in rows),
            Counter(error_cause(e) for _, _, e in rows if e is not None))


@given(st.lists(_rows, min_size=1, max_size=5))
def test_the_cards_counts_are_every_rows(tmp_path_factory, files):
    """``column_counts`` (files read at once, counted by pyarrow) counts each row as a plain
    loop over the rows does: lengths of rows without an error, finish reasons (none for a
    null), error rows by cause."""
    root = tmp_path_factory.mktemp("counts")
    manifests = []
    for k, rows in enumerate(files):
        pq.write_table(_table(rows), root / f"f{k}.parquet", row_group_size=7)
        manifests.append(SimpleNamespace(data_key=f"f{k}.parquet"))
    assert column_counts(FS, str(root), manifests) == _loop_counts(files)


def _committed_output(root, files, old) -> list:
    """Each file of rows committed as a shard through ``Output.write_shard``; the manifests of
    the shards ``old`` names rewritten as older code wrote them (no counts), the data files of
    the others removed (the card must not need them). The manifests, read back from the output."""
    out = Output(FS, str(root))
    for k, rows in enumerate(files):
        m = out.write_shard(f"s{k}", RowRange("in.parquet", 1, None, k, len(rows)), _table(rows), "fp",
                            ShardStats(len(rows), 0, 0, 0.0, 0.0, 0.0, "node", 1))
        if k in old:
            body = json.loads(m.to_json())
            del body["counts"]
            (root / "_manifest" / f"s{k}.json").write_text(json.dumps(body))
        else:
            (root / m.data_key).unlink()
    return sorted(out.manifests().values(), key=lambda m: m.shard_id)


@given(st.lists(_rows, min_size=1, max_size=5), st.sets(st.integers(0, 4)))
def test_the_cards_counts_from_manifests_are_every_rows(tmp_path_factory, files, old):
    """Each replica counts the shard it writes into its manifest; the card sums the manifests
    and reads no data file, but for shards whose manifests older code wrote (without counts):
    the counts are those of a plain loop over every row, whichever shards are old."""
    root = tmp_path_factory.mktemp("manifest-counts")
    manifests = _committed_output(root, files, old)
    assert [m.counts is None for m in manifests] == [k in old for k in range(len(files))]
    assert card_counts(FS, str(root), manifests) == _loop_counts(files)


def test_an_output_whose_manifests_lack_the_counts_gets_the_cards_counts(tmp_path):
    """An output written before manifests carried counts: every shard's data file is read."""
    files = [[(3, "eos", None), (None, None, "empty prompt")], [(4, "length", None), (4, "eos", "duplicate id 'a'")]]
    manifests = _committed_output(tmp_path, files, old={0, 1})
    assert card_counts(FS, str(tmp_path), manifests) == (Counter({3: 1, 4: 1}), Counter({"eos": 2, "length": 1, "none": 1}),
                                                        Counter({"empty prompt": 1, "duplicate id …": 1}))

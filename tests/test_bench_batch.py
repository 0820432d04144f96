"""``bench`` writes a plot beside its JSON (issue 20, item 4): tokens/s against batch size,
a line per cache mode, from the ``batch`` section's runs."""

from __future__ import annotations

import json

from illada_batch.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bench_batch_writes_each_cache_modes_tokens_per_s_by_batch_size_and_its_plot(tmp_path, capsys, monkeypatch):
    import matplotlib.image

    monkeypatch.setenv("ILLADA_THREADS", "1")
    out_path = tmp_path / "bench.json"
    code = main(["bench", "--only", "batch", "--rows", "5", "--cache", "off,prefix", "--out", str(out_path)])
    assert code == 0
    runs = json.loads(out_path.read_text())["batch"]
    assert {(r["cache"], r["batch"]) for r in runs} == {(c, b) for c in ("off", "prefix") for b in (1, 4)}
    assert all(r["rows"] == 5 and r["tokens_per_s"] > 0 for r in runs)
    plot = tmp_path / "bench-batch.png"
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert matplotlib.image.imread(plot).ndim == 3
    assert f"wrote {plot}" in capsys.readouterr().out

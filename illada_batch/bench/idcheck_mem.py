"""``illada-batch bench --only scale --ids N``: the duplicate-id check on N ids (Parquet files
of a million ids on local disk, one row in a thousand repeating an earlier id), in a child
process so that its peak memory (ru_maxrss) is the check's own: the bounded check
(``job/idcheck.py``, the driver's) and, up to ``IN_MEMORY_MAX`` ids, the in-memory one it
replaced (``shards.mark_duplicate_ids``)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FILE_IDS = 1_000_000
IN_MEMORY_MAX = 2_000_000  # beyond this the in-memory check needs GBs: not run


def _write(folder: Path, n: int) -> None:
    for f, start in enumerate(range(0, n, FILE_IDS)):
        k = min(FILE_IDS, n - start)
        ids = [f"r{start + i:010d}" if (start + i) % 1000 != 999 or start + i < 1500 else f"r{start + i - 1500:010d}" for i in range(k)]
        pq.write_table(pa.table({"id": ids, "prompt": ["p"] * k}), folder / f"part-{f:04d}.parquet",
                       row_group_size=100_000)


def _child(folder: str, which: str) -> None:
    from illada_batch.job.idcheck import mark_duplicate_ids_bounded
    from illada_batch.job.shards import mark_duplicate_ids, plan_shards

    shards, _ = plan_shards(folder, {}, 1000, ["id", "prompt"], "id", "prompt")
    check = mark_duplicate_ids_bounded if which == "bounded" else mark_duplicate_ids
    t0 = time.perf_counter()
    marked, _ = check(folder, {}, shards, "id")
    print(json.dumps({"check": which, "seconds": time.perf_counter() - t0,
                      "repeats": sum(len(s.duplicates) for s in marked),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_idcheck(n: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(prefix="illada-ids-bench-") as tmp:
        _write(Path(tmp), n)
        for which in ("bounded", "in-memory") if n <= IN_MEMORY_MAX else ("bounded",):
            proc = subprocess.run([sys.executable, "-m", "illada_batch.bench.idcheck_mem", tmp, which],
                                  capture_output=True, text=True, check=True)
            out.append({"ids": n, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

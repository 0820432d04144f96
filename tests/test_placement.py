"""Whether a replica is placed, through Ray's public API (issue 20, item 2): every replica
lives in its own placement group, and a group's resources are reserved or not
(``job/placements.py``); no module reads Ray's private state, which an upgrade may change."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import illada_batch

PACKAGE = Path(illada_batch.__file__).parent


def _forbidden_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n.split(".")[0] == "ray" and (any(p.startswith("_") for p in n.split(".")[1:])
                                                           or n.startswith("ray.util.state"))]


def test_no_module_imports_a_private_part_of_ray_or_its_dashboard_state_api():
    """Private modules change with Ray's versions; ``ray.util.state`` is served by the
    dashboard, which the embedded local Ray (``include_dashboard=False``) does not start."""
    found = {str(p.relative_to(PACKAGE)): names for p in sorted(PACKAGE.rglob("*.py"))
             if (names := _forbidden_imports(p))}
    assert found == {}, f"Ray's private or dashboard-only modules: {found}"


@pytest.mark.slow
def test_a_replica_is_placed_when_its_group_is_reserved_and_not_before(ray_cluster):
    """Three replicas of 1 CPU on 2 CPUs: two groups are reserved, the third is not (it is
    demand) until one of the two ends; then it is reserved with no new request."""
    import ray

    from illada_batch.job.placements import Placements

    @ray.remote
    class Idle:
        def pid(self) -> int:
            import os

            return os.getpid()

    placements = Placements(ranks=1, num_cpus=1, num_gpus=0)
    handles = [placements.start(lambda **where: Idle.options(num_cpus=1, **where).remote()) for _ in range(3)]
    assert all(pid > 0 for pid in ray.get([h.pid.remote() for h in handles[:2]], timeout=60))
    assert [placements.reserved(h) for h in handles] == [True, True, False], "no CPU is left for the third"
    waiting = handles[2].pid.remote()
    placements.end(handles[0])
    assert ray.get(waiting, timeout=60) > 0, "the freed CPU goes to the waiting replica"
    assert placements.reserved(handles[2])
    for h in handles[1:]:
        placements.end(h)

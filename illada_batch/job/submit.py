"""``illada-batch submit``: a job spec to a Ray cluster through Ray Job Submission.

The spec travels in the runtime env (``ILLADA_JOB_SPEC``, a local prefix file inlined), and
the entrypoint is ``illada-batch run --spec-env ILLADA_JOB_SPEC``. The submission id is
derived from the job name and date (``render.submission_id``), so a re-fired nightly tick
cannot start a duplicate run: Ray refuses an id it has seen, and we say so and exit 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time

import yaml

from illada_batch.job.render import embedded_spec, submission_id


def _absolute_local_paths(spec, text: str) -> str:
    """Local paths made absolute, for a cluster that shares this filesystem (e.g. local Ray)."""
    data = yaml.safe_load(text)
    r = spec.resolved()
    for section, key, value in (("input", "url", r.input.url), ("output", "url", r.output.url),
                                ("model", "path", r.model.path)):
        if "://" not in value:
            data.setdefault(section, {})[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def submit(spec_path: str, address: str, overrides: list[str] | None = None, date: str | None = None,
           run_id: str | None = None, wait: bool = False) -> int:
    """Submit the job to the Ray cluster at ``address`` (http://HEAD:8265); the exit code.
    ``run_id``: the submission id (default: derived from the job name and date)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec, text = embedded_spec(spec_path, overrides)
    text = _absolute_local_paths(spec, text)
    date = date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    sid = run_id or submission_id(spec.name, date)
    client = JobSubmissionClient(address)
    entrypoint = f"illada-batch run --spec-env ILLADA_JOB_SPEC --date {date} --quiet"
    deadline = time.time() + 120
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid,
                              runtime_env={"env_vars": {"ILLADA_JOB_SPEC": text}})
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError with the server's message
            if "already exists" in str(exc):
                print(f"{sid}: already submitted to {address}; not starting a duplicate run")
                return 0
            if "No available agent" in str(exc) and time.time() < deadline:  # a head still starting up
                time.sleep(2)
                continue
            raise
    print(sid)
    if not wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(sid):
            sys.stdout.write(lines)

    asyncio.run(follow())
    final = client.get_job_status(sid)
    print(f"{sid}: {final}")
    return 0 if final == JobStatus.SUCCEEDED else 1

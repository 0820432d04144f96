"""KubeRay manifests for a job spec: ``illada-batch render rayjob JOB.yaml --date D``.

Design note: how the spec reaches the cluster. There is one mechanism, used by the RayJob
and by ``illada-batch submit``: the job spec YAML travels *inside the Ray runtime env*, as
the environment variable ``ILLADA_JOB_SPEC``, and the entrypoint is
``illada-batch run --spec-env ILLADA_JOB_SPEC --date D``. No ConfigMap, no volume, no
image rebuild: the RayJob (or the Job Submission request) alone says what runs.

The embedded spec is self-contained (``embedded_spec``): ``--set`` overrides are applied,
and a local ``prefix.file`` is inlined as ``prefix.text``, because the pod has no copy of
``jobs/``. The prefix *text* is what the fingerprint hashes, so inlining keeps the
fingerprint, and a resumed run on the cluster matches one started elsewhere. Remote paths
(``s3://...``) stay as they are; local relative model/input paths would point into the pod,
so cluster specs use URLs.

Names. A run is identified by ``submission_id(job, date)``: ``illada-<job>-<date>``, a
DNS-1035 label of at most 47 characters (KubeRay's RayJob name limit: it appends 6
characters for the RayCluster and must stay under 53). The RayJob's ``metadata.name`` and
``spec.jobId`` are both that id, and ``submit`` uses it as the Ray submission id; Kubernetes
refuses a second RayJob of the same name and Ray a second submission of the same id, so a
scheduler that fires twice for one date starts one run.

Rendering is a pure function of (spec file, date, overrides, image): the same inputs give
byte-identical YAML (no timestamps, stable key order).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import re

import yaml

from illada_batch.job.spec import JobSpec, SpecError, load_spec

DEFAULT_IMAGE = "ghcr.io/illada/illada-batch:0.1.0"
SPEC_ENV = "ILLADA_JOB_SPEC"  # the runtime-env variable that carries the spec YAML
SERVICE_ACCOUNT = "illada-batch-replica"  # bound to the replica IAM role (IRSA), see cluster/kuberay.yaml
MODEL_CACHE = "/model-cache"  # ILLADA_MODEL_CACHE in worker pods: weights copied once per pod

MAX_NAME = 47  # KubeRay: RayJob name <= 53 - 6
TTL_AFTER_FINISHED_S = 3600  # keep the finished RayCluster an hour for logs, then delete it
ACTIVE_DEADLINE_S = 20 * 3600  # a nightly run must end before the next night's run starts
MAX_SPEC_BYTES = 64 * 1024  # env var and CR size sanity bound: use an s3:// prefix.file beyond it

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --- names ------------------------------------------------------------------------------


def _check_date(date: str) -> str:
    if not isinstance(date, str) or not _DATE.match(date):
        raise SpecError(f"--date {date!r}: expected YYYY-MM-DD (date -u +%F)")
    try:
        _dt.date.fromisoformat(date)
    except ValueError:
        raise SpecError(f"--date {date!r}: not a calendar date") from None
    return date


def run_id(spec_path: str, date: str, overrides: list[str] | None = None) -> str:
    """The run id (submission id, RayJob name) of a job spec file for ``date``."""
    return submission_id(load_spec(spec_path, overrides, runs_here=False).name, _check_date(date))


def submission_id(job_name: str, date: str) -> str:
    """``illada-<job>-<date>``: the Ray submission id, RayJob name and jobId of one run.

    A DNS-1035 label (lowercase letters, digits, '-'; starts with a letter) of at most 47
    characters. Job names that are already lowercase DNS-safe and short map to themselves;
    any other name (uppercase, '_', '.', too long) gets a 6-hex hash of the exact name, so
    two job names never share an id ("Nightly" and "nightly" write to different outputs).
    """
    _check_date(date)
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", job_name.lower())).strip("-")
    room = MAX_NAME - len("illada-") - len(date) - 1
    if slug == job_name and len(slug) <= room:
        return f"illada-{slug}-{date}"
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:6]
    slug = slug[: room - len(digest) - 1].strip("-")
    return f"illada-{slug + '-' if slug else ''}{digest}-{date}"


# --- the embedded spec ------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def embedded_spec(spec_path: str, overrides: list[str] | None = None) -> tuple[JobSpec, str]:
    """Validate the spec (SpecError on a bad one) and return it with its self-contained YAML
    text: overrides applied, a local ``prefix.file`` inlined as ``prefix.text``."""
    spec = load_spec(spec_path, overrides, runs_here=False)
    data = spec.model_dump(mode="json", exclude_unset=True)
    if spec.prefix.file is not None and _is_local(spec.prefix.file):
        data["prefix"] = {"text": spec.prefix_text()}
    text = _dump(data)
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(f"{spec_path}: the embedded spec is {len(text.encode())} bytes (> {MAX_SPEC_BYTES}); "
                        f"put the prefix in an s3:// prefix.file instead of inlining it")
    return spec, text


# --- the RayJob -------------------------------------------------------------------------


def _qty(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _pod(container_name: str, image: str, requests: dict, *, gpus: int, env: list | None = None,
         ports: list | None = None, cache: bool = False) -> dict:
    container: dict = {"name": container_name, "image": image}
    if ports:
        container["ports"] = ports
    if env:
        container["env"] = env
    container["resources"] = {"requests": dict(requests), "limits": dict(requests)}
    if cache:
        container["volumeMounts"] = [{"name": "model-cache", "mountPath": MODEL_CACHE}]
    pod: dict = {"serviceAccountName": SERVICE_ACCOUNT, "containers": [container]}
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if cache:
        pod["volumes"] = [{"name": "model-cache", "emptyDir": {"sizeLimit": "64Gi"}}]
    return {"spec": pod}


def _cluster_spec(spec: JobSpec, image: str) -> dict:
    gpus = math.ceil(spec.resources.num_gpus)  # Kubernetes GPUs are whole: a fractional request gets one
    cpus = max(spec.resources.num_cpus, 1)
    # Memory: 4 GiB per CPU, plus 16 GiB on GPU pods to stage the bf16 weights of an 8B model.
    worker_req = {"cpu": _qty(cpus), "memory": f"{math.ceil(4 * cpus) + (16 if gpus else 0)}Gi"}
    if gpus:
        worker_req["nvidia.com/gpu"] = str(gpus)
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    lo, hi = spec.replica_range
    autoscaling = {"enableInTreeAutoscaling": True} if lo < hi else {}  # KubeRay's autoscaler grows the group
    return {
        **autoscaling,
        "headGroupSpec": {
            # The head runs the driver only (no torch); num-cpus 0 keeps replicas off it.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod("ray-head", image, {"cpu": "2", "memory": "8Gi"}, gpus=0, ports=head_ports),
        },
        "workerGroupSpecs": [{
            # One pod per replica: `replicas` min to max (a range: Ray's autoscaler adds pods for the
            # replicas the driver asks for and cannot place yet; a number: fixed for the run).
            "groupName": "replicas",
            "replicas": lo,
            "minReplicas": lo,
            "maxReplicas": hi,
            "rayStartParams": {},
            "template": _pod("ray-worker", image, worker_req, gpus=gpus, cache=True,
                             env=[{"name": "ILLADA_MODEL_CACHE", "value": MODEL_CACHE}]),
        }],
    }


def render_rayjob(spec_path: str, date: str, overrides: list[str] | None = None,
                  image: str | None = None) -> str:
    """The KubeRay ``RayJob`` (ray.io/v1) that runs ``spec_path`` for ``date``, as YAML text.
    ``image``: of the Ray pods; default ``$ILLADA_IMAGE``, else ``DEFAULT_IMAGE``."""
    image = image or os.environ.get("ILLADA_IMAGE", DEFAULT_IMAGE)
    _check_date(date)
    spec, spec_text = embedded_spec(spec_path, overrides)
    run_id = submission_id(spec.name, date)
    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": run_id,
            "labels": {"app.kubernetes.io/name": "illada-batch",
                       "illada-batch/job": run_id.removeprefix("illada-").removesuffix(f"-{date}"),
                       "illada-batch/date": date},
        },
        "spec": {
            "entrypoint": f"illada-batch run --spec-env {SPEC_ENV} --date {date}",
            "runtimeEnvYAML": _dump({"env_vars": {SPEC_ENV: spec_text}}),
            "jobId": run_id,
            "metadata": {"illada_job": spec.name, "illada_date": date},
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "activeDeadlineSeconds": ACTIVE_DEADLINE_S,
            # No RayJob-level retry (each would build a new cluster): replicas and shards retry
            # inside the run, and a rerun resumes from the committed shards.
            "backoffLimit": 0,
            "rayClusterSpec": _cluster_spec(spec, image),
        },
    }
    return _dump(doc)


# --- YAML -------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None  # multi-line text (the spec, the prefix) stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)

"""Deployment files: cluster/, infra/, jobs/ and the RayJob renderer.

Everything here is offline and fast: files are parsed and cross-checked against each other
(the IAM policy against the job specs' URLs, the cluster node shapes against the replicas'
resource requests), Ray's own cluster-config schema and autoscaler planner are run on
cluster/aws.yaml, and the scheduling scripts run against stub `kubectl` / `illada-batch`.
"""

from __future__ import annotations

import configparser
import copy
import datetime as dt
import fnmatch
import importlib.util
import json
import os
import re
import subprocess
from functools import partial
from pathlib import Path

import pytest
import yaml

from illada_batch.cli import main as cli
from illada_batch.job.render import SPEC_ENV, embedded_spec, render_rayjob, submission_id
from illada_batch.job.spec import SpecError, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIRS = ("cluster", "infra", "jobs")
NIGHTLY = ROOT / "jobs" / "nightly.yaml"
DATE = "2025-01-01"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

YAML_FILES = sorted(p for d in DEPLOY_DIRS for ext in ("*.yaml", "*.yml") for p in (ROOT / d).rglob(ext))
JSON_FILES = sorted(p for d in DEPLOY_DIRS for p in (ROOT / d).rglob("*.json"))
JOB_SPECS = sorted((ROOT / "jobs").glob("*.yaml"))


def load_job(path: Path):
    """A shipped job spec, read as a deployment artifact: the machine that runs it has its
    backend installed (where vLLM is missing, running a vllm spec is refused; see
    test_job_spec_validates)."""
    return load_spec(path, runs_here=False)


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    found = [d for d in docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{rel(path)}: expected one {kind}, found {len(found)}"
    return found[0]


# --- every file parses ------------------------------------------------------------------


def test_the_deployment_files_exist():
    have = {rel(p) for p in YAML_FILES + JSON_FILES}
    for f in ["cluster/aws.yaml", "cluster/kuberay.yaml", "infra/nightly-cronjob.yaml", "jobs/nightly.yaml",
              "jobs/synthetic-math.yaml", "infra/bucket-lifecycle.json", "infra/iam/replica-policy.json",
              "infra/iam/scheduler-policy.json"]:
        assert f in have, f"{f} is missing"


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    assert docs(path), f"{rel(path)}: no YAML document"


@pytest.mark.parametrize("path", JOB_SPECS, ids=rel)
def test_job_spec_validates(path):
    if yaml.safe_load(path.read_text()).get("backend") == "vllm" and importlib.util.find_spec("vllm") is None:
        with pytest.raises(SpecError, match="needs vLLM, which is not installed"):
            load_spec(path)
    spec = load_job(path)
    assert spec.prefix_text() or spec.prefix.file is None  # a declared prefix file exists


@pytest.mark.parametrize("path", JOB_SPECS, ids=rel)
def test_every_job_renders_as_a_rayjob_here(path):
    """Rendering and submitting happen on a laptop or CI box without the backend's packages."""
    job = yaml.safe_load(render_rayjob(str(path), DATE))
    assert job["kind"] == "RayJob"
    embedded = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"][SPEC_ENV]
    assert yaml.safe_load(embedded)["name"] == yaml.safe_load(path.read_text())["name"]


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_the_example_jobs_are_what_they_say():
    nightly = load_spec(NIGHTLY)
    assert (nightly.replica_range, nightly.resources.num_gpus, nightly.resources.num_cpus, nightly.chat) == ((1, 8), 1, 8, True)
    assert (nightly.sampling.steps, nightly.sampling.gen_length, nightly.sampling.block_length,
            nightly.sampling.threshold, nightly.engine.cache) == (128, 256, 32, 0.9, "blocks")
    math = load_spec(ROOT / "jobs" / "synthetic-math.yaml")
    assert (math.n, math.sampling.temperature, math.input.variables) == (4, 0.7, ["difficulty"])
    assert math.template.format(prompt="fractions", difficulty="easy") == "Topic: fractions\nDifficulty: easy"
    for spec in (nightly, math):
        words = len(spec.prefix_text().split())
        assert 300 <= words <= 600, f"{spec.name}: prefix of {words} words"
        assert spec.prefix_text().count("Example ") >= 3


# --- the rendered RayJob ----------------------------------------------------------------


def rayjob(date: str = DATE, overrides=None) -> dict:
    return yaml.safe_load(render_rayjob(str(NIGHTLY), date, overrides))


def embedded(job: dict) -> dict:
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert set(env) == {SPEC_ENV}
    return yaml.safe_load(env[SPEC_ENV])


def test_rayjob_carries_the_full_job_spec():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"] == f"illada-batch run --spec-env {SPEC_ENV} --date {DATE}"
    got = embedded(job)
    want = yaml.safe_load(NIGHTLY.read_text())
    # The one change: the local prefix file travels as its text (the pod has no jobs/ folder).
    want["prefix"] = {"text": (NIGHTLY.parent / want["prefix"]["file"]).read_text()}
    assert got == want
    # ... and it is the same job: what `run --spec-env` builds has the file's fingerprint.
    assert spec_from_dict(got).fingerprint() == load_spec(NIGHTLY).fingerprint()


def test_rayjob_applies_overrides_to_the_embedded_spec():
    got = embedded(rayjob(overrides=["replicas=2", "sampling.threshold=0.8"]))
    assert (got["replicas"], got["sampling"]["threshold"]) == (2, 0.8)


def test_rayjob_is_named_by_the_date():
    job = rayjob()
    run_id = submission_id("nightly", DATE)
    assert run_id == f"illada-nightly-{DATE}"
    assert job["metadata"]["name"] == job["spec"]["jobId"] == run_id
    assert DNS1035.match(run_id) and len(run_id) <= 47
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["activeDeadlineSeconds"] > 0


def test_render_is_a_function_of_its_inputs():
    assert render_rayjob(str(NIGHTLY), DATE) == render_rayjob(str(NIGHTLY), DATE)
    a, b = rayjob(DATE), rayjob("2025-01-02")
    assert a != b and a["metadata"]["name"] != b["metadata"]["name"]


def test_submission_ids_are_dns_safe_and_distinct():
    names = ["nightly", "Nightly", "nightly_v2", "nightly-v2", "my.job", "my-job", "x-", "x", "9lives",
             "a" * 79, "a" * 80, "A" * 80]
    ids = [submission_id(n, DATE) for n in names]
    for name, run_id in zip(names, ids):
        assert DNS1035.match(run_id) and len(run_id) <= 47 and run_id.endswith(f"-{DATE}"), (name, run_id)
    assert len(set(ids)) == len(ids), ids  # two job names never share a run id


@pytest.mark.parametrize("date", ["2025-1-1", "2025-02-30", "today", "2025-01-01; rm -rf /"])
def test_bad_dates_are_refused(date):
    with pytest.raises(SpecError, match="--date"):
        submission_id("nightly", date)


def test_rayjob_cluster_follows_the_spec():
    spec = load_spec(NIGHTLY)
    cluster = rayjob()["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    # a range: the pods start at min and KubeRay's autoscaler grows them to max for the replicas not placed yet
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 8) == (1, *spec.replica_range)
    assert cluster["enableInTreeAutoscaling"] is True
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and float(limits["cpu"]) >= spec.resources.num_cpus
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    cpu_only = rayjob(overrides=["resources.num_gpus=0", "replicas=3"])["spec"]["rayClusterSpec"]
    (group,) = cpu_only["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert "enableInTreeAutoscaling" not in cpu_only  # a fixed number: nothing to grow
    assert "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "tolerations" not in group["template"]["spec"]


def test_rayjob_pods_match_the_kuberay_cluster():
    """One identity and one GPU toleration for RayJob pods and the long-lived RayCluster."""
    sa = one(ROOT / "cluster" / "kuberay.yaml", "ServiceAccount")["metadata"]["name"]
    cluster = rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
    assert all(p["serviceAccountName"] == sa for p in pods)


def test_a_bad_spec_is_refused_before_rendering(tmp_path, capsys):
    bad = yaml.safe_load(NIGHTLY.read_text())
    bad["sampling"]["gen_length"] = 100  # not a multiple of block_length
    bad["prefix"] = {"text": "x"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError, match="sampling"):
        render_rayjob(str(path), DATE)
    with pytest.raises(SystemExit) as exit_:
        cli(["render", "rayjob", str(path), "--date", DATE])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and "sampling" in out.err


def test_embedded_spec_refuses_a_huge_inlined_prefix(tmp_path):
    raw = yaml.safe_load(NIGHTLY.read_text())
    (tmp_path / "big.txt").write_text("word " * 20000)
    raw["prefix"] = {"file": "big.txt"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="s3:// prefix.file"):
        embedded_spec(str(tmp_path / "job.yaml"))


def test_main_prints_the_rayjob_and_the_id(capsys):
    assert cli(["render", "rayjob", str(NIGHTLY), "--date", DATE, "--image", "example.com/img:1"]) == 0
    out = capsys.readouterr().out
    assert out == render_rayjob(str(NIGHTLY), DATE, image="example.com/img:1")
    assert "example.com/img:1" in out
    assert cli(["render", "submission-id", str(NIGHTLY), "--date", DATE]) == 0
    assert capsys.readouterr().out.strip() == f"illada-nightly-{DATE}"


# --- the nightly schedule: Kubernetes -----------------------------------------------------

CRONJOB = ROOT / "infra" / "nightly-cronjob.yaml"


def test_cronjob_runs_once_a_night_with_deadlines():
    cron = one(CRONJOB, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec.get("timeZone") in ("Etc/UTC", "UTC")
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and 0 < spec["startingDeadlineSeconds"] < 86400
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["activeDeadlineSeconds"], int) and job["activeDeadlineSeconds"] > 0
    assert isinstance(job["backoffLimit"], int)


def _pod(cron: dict) -> dict:
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cronjob_renders_todays_rayjob_from_the_nightly_spec():
    pod = _pod(one(CRONJOB, "CronJob"))
    (render,) = pod["initContainers"]
    script = "\n".join(render["args"])
    assert "illada-batch render rayjob /spec/nightly.yaml" in script and "date -u +%F" in script
    # The ConfigMap volume rebuilds jobs/' layout, so the spec's relative prefix.file resolves.
    (vol,) = [v for v in pod["volumes"] if "configMap" in v]
    paths = {i["path"] for i in vol["configMap"]["items"]}
    assert paths == {"nightly.yaml", load_spec(NIGHTLY).prefix.file}
    # The scheduler may create RayJobs, and it is the pod's identity.
    role = one(CRONJOB, "Role")
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    assert one(CRONJOB, "RoleBinding")["subjects"][0]["name"] == pod["serviceAccountName"]


@pytest.fixture
def stub_bin(tmp_path):
    """A bin/ folder for stub commands; each stub logs its argv to LOG and acts on MODE."""
    b = tmp_path / "bin"
    b.mkdir()

    def add(name: str, body: str) -> None:
        (b / name).write_text("#!/bin/sh\n" + f'echo "{name} $*" >> "$LOG"\n' + body)
        (b / name).chmod(0o755)

    return b, add


@pytest.mark.parametrize("mode,rc", [("ok", 0), ("exists", 0), ("denied", 1)])
def test_cronjob_create_treats_already_exists_as_done(tmp_path, stub_bin, mode, rc):
    b, add = stub_bin
    add("kubectl", '''case "$MODE" in
  ok) echo "rayjob.ray.io/illada-nightly-x created";;
  exists) echo 'Error from server (AlreadyExists): error when creating "r.yaml": rayjobs.ray.io "x" already exists' >&2; exit 1;;
  *) echo 'Error from server (Forbidden): rayjobs.ray.io is forbidden' >&2; exit 1;;
esac
''')
    (create,) = _pod(one(CRONJOB, "CronJob"))["containers"]
    assert "kubectl create" in create["args"][0] and "kubectl apply" not in create["args"][0]
    script = create["args"][0].replace("/work/", f"{tmp_path}/")
    log = tmp_path / "log"
    res = subprocess.run(["sh", "-c", script], env={**os.environ, "PATH": f"{b}:{os.environ['PATH']}",
                                                    "MODE": mode, "LOG": str(log)}, capture_output=True, text=True)
    assert res.returncode == rc, res.stderr
    assert log.read_text().split() == ["kubectl", "create", "-f", f"{tmp_path}/rayjob.yaml"]


# --- the nightly schedule: plain Ray + systemd ---------------------------------------------

NIGHTLY_SH = ROOT / "infra" / "nightly-ray.sh"


@pytest.mark.parametrize("mode,rc", [("ok", 0), ("exists", 0), ("broken", 3)])
def test_nightly_ray_script_submits_once_per_date(tmp_path, stub_bin, mode, rc):
    b, add = stub_bin
    # The run id comes from the package (the function the RayJob uses); stub it here, since
    # its value is tested above, and check the script asks for the nightly spec's id.
    add("illada-batch", '''if [ "$1" = render ]; then
  [ "$1 $2 $3 $4" = "render submission-id jobs/nightly.yaml --date" ] || exit 9
  echo "illada-nightly-$5"; exit 0
fi
case "$MODE" in
  ok) echo "submitted";;
  exists) echo "RuntimeError: Job with submission_id illada-nightly-x already exists. Please use a different submission_id." >&2; exit 1;;
  *) echo "ConnectionError: cannot reach the dashboard" >&2; exit 3;;
esac
''')
    log = tmp_path / "log"
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265", "ILLADA_HOME": str(ROOT),
           "ILLADA_VENV": str(tmp_path), "MODE": mode, "LOG": str(log)}
    res = subprocess.run(["bash", str(NIGHTLY_SH)], env=env, capture_output=True, text=True)
    assert res.returncode == rc, res.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("illada-batch render submission-id ")
    submit = calls[1].split()
    date = submit[submit.index("--date") + 1]
    assert abs((dt.date.fromisoformat(date) - dt.datetime.now(dt.timezone.utc).date()).days) <= 1
    assert submit[:4] == ["illada-batch", "submit", "jobs/nightly.yaml", "--address"]
    assert submit[submit.index("--submission-id") + 1] == f"illada-nightly-{date}"


def test_nightly_ray_script_needs_an_address(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run(["bash", str(NIGHTLY_SH)], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "RAY_ADDRESS" in res.stderr


def _unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str
    cp.read_string(path.read_text())
    return cp


def test_systemd_timer_fires_the_service_at_2_utc():
    timer = _unit(ROOT / "infra" / "illada-nightly.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:00:00 UTC"
    assert timer["Timer"]["Unit"] == "illada-nightly.service"
    service = _unit(ROOT / "infra" / "illada-nightly.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].endswith("infra/nightly-ray.sh")
    assert os.access(NIGHTLY_SH, os.X_OK)


# --- IAM and the bucket -------------------------------------------------------------------


def _s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def spec_urls() -> dict[str, list[tuple[str, str]]]:
    """(bucket, an example object key) the jobs read and write, by access kind."""
    out: dict[str, list] = {"read": [], "write": [], "list": []}
    for path in JOB_SPECS:
        spec = load_job(path)
        for url in (spec.model.path, spec.input.url):
            if url.startswith("s3://"):
                bucket, key = _s3(url)
                base = key.replace("*", "x") if "*" in key else key.rstrip("/") + "/x.bin"
                out["read"].append((bucket, base))
                out["list"].append((bucket, key.split("*")[0]))
        if spec.output_url(DATE).startswith("s3://"):
            bucket, key = _s3(spec.output_url(DATE))
            for leaf in ("data/part-0-0123456789ab.parquet", "_manifest/0.json", "_SUCCESS.json"):
                out["write"].append((bucket, f"{key}/{leaf}"))
            out["list"].append((bucket, f"{key}/data/"))
    assert out["read"] and out["write"], "no job spec uses s3:// URLs"
    return out


def spec_prefixes() -> set[tuple[str, str]]:
    """(bucket, top-level prefix) of every s3:// URL in the job specs: models/, inputs/, outputs/."""
    return {(b, k.split("/")[0] + "/") for kind in spec_urls().values() for b, k in kind}


def statements(policy: dict) -> list[dict]:
    out = []
    for s in policy["Statement"]:
        assert s["Effect"] == "Allow"
        out.append({**s, "Action": _list(s["Action"]), "Resource": _list(s["Resource"])})
    return out


def _list(x) -> list:
    return x if isinstance(x, list) else [x]


def allowed(policy: dict, action: str, arn: str) -> bool:
    return any(any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in s["Action"])
               and any(fnmatch.fnmatchcase(arn, r) for r in s["Resource"]) for s in statements(policy))


REPLICA = json.loads((ROOT / "infra" / "iam" / "replica-policy.json").read_text())
SCHEDULER = json.loads((ROOT / "infra" / "iam" / "scheduler-policy.json").read_text())


def test_replica_policy_names_only_the_prefixes_the_jobs_use():
    prefixes = spec_prefixes()
    assert {p for _, p in prefixes} == {"models/", "inputs/", "outputs/"}
    for s in statements(REPLICA):
        for arn in s["Resource"]:
            assert arn.startswith("arn:aws:s3:::"), arn
            bucket, _, key = arn.removeprefix("arn:aws:s3:::").partition("/")
            if key:  # an object ARN: inside one of the specs' prefixes
                assert any(b == bucket and key.startswith(p) for b, p in prefixes), arn
            else:  # the bucket ARN (ListBucket): only with a prefix condition inside them
                assert s["Action"] == ["s3:ListBucket"], s
                listed = _list(s["Condition"]["StringLike"]["s3:prefix"])
                assert listed and all(any(b == bucket and pat.startswith(p) for b, p in prefixes)
                                      for pat in listed), listed


def test_replica_policy_covers_every_spec_url():
    urls = spec_urls()
    for bucket, key in urls["read"]:
        arn = f"arn:aws:s3:::{bucket}/{key}"
        assert allowed(REPLICA, "s3:GetObject", arn), arn
        assert not allowed(REPLICA, "s3:PutObject", arn), f"{arn}: inputs and models are read-only"
    for bucket, key in urls["write"]:
        arn = f"arn:aws:s3:::{bucket}/{key}"
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert allowed(REPLICA, action, arn), (action, arn)
    (listing,) = [s for s in statements(REPLICA) if s["Action"] == ["s3:ListBucket"]]
    patterns = _list(listing["Condition"]["StringLike"]["s3:prefix"])
    for bucket, prefix in urls["list"]:
        assert f"arn:aws:s3:::{bucket}" in listing["Resource"]
        assert any(fnmatch.fnmatchcase(prefix, p) for p in patterns), prefix


def test_scheduler_policy_cannot_write_data():
    for action in ("s3:PutObject", "s3:DeleteObject", "s3:GetObject"):
        for s in statements(SCHEDULER):
            assert not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in s["Action"]), (action, s)
    assert allowed(SCHEDULER, "eks:DescribeCluster", "arn:aws:eks:us-east-1:ACCOUNT_ID:cluster/illada")


def test_lifecycle_aborts_uploads_and_expires_tagged_orphans():
    rules = json.loads((ROOT / "infra" / "bucket-lifecycle.json").read_text())["Rules"]
    assert all(r["Status"] == "Enabled" for r in rules)
    (abort,) = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert abort["Filter"] == {"Prefix": ""} and abort["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    (orphan,) = [r for r in rules if "Expiration" in r]
    assert orphan["Expiration"] == {"Days": 7}
    cond = orphan["Filter"]["And"]
    assert cond["Tags"] == [{"Key": "illada-batch:orphan", "Value": "true"}]
    for bucket, key in spec_urls()["write"]:
        assert key.startswith(cond["Prefix"]), key  # the rule reaches every job's data files


# --- the clusters -------------------------------------------------------------------------

AWS = ROOT / "cluster" / "aws.yaml"


def gpu_jobs() -> list:
    jobs = [s for s in (load_job(p) for p in JOB_SPECS) if s.resources.num_gpus > 0]
    assert jobs, "no GPU job spec"
    return jobs


def test_aws_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(AWS.read_text())))


def test_aws_gpu_workers_are_spot_with_an_on_demand_twin():
    types = yaml.safe_load(AWS.read_text())["available_node_types"]
    spot, ondemand = types["gpu_spot"], types["gpu_ondemand"]
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in ondemand["node_config"]
    same = {k: v for k, v in spot["node_config"].items() if k != "InstanceMarketOptions"}
    assert same == ondemand["node_config"]
    assert ondemand["max_workers"] < spot["max_workers"]
    assert types["head"]["node_config"]["InstanceType"] == "m6i.2xlarge"
    for t in (spot, ondemand):
        assert t["node_config"]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/illada-batch-replica")
    setup = " ".join(yaml.safe_load(AWS.read_text())["setup_commands"])
    assert "pip install" in setup and "illada-batch" in setup


def test_aws_gpu_workers_fit_every_gpu_job():
    types = yaml.safe_load(AWS.read_text())["available_node_types"]
    for spec in gpu_jobs():
        for name in ("gpu_spot", "gpu_ondemand"):
            res = types[name]["resources"]
            assert res["GPU"] >= spec.resources.num_gpus and res["CPU"] >= spec.resources.num_cpus, (name, spec.name)
        capacity = sum(types[n]["max_workers"] * int(types[n]["resources"]["GPU"] // spec.resources.num_gpus)
                       for n in ("gpu_spot", "gpu_ondemand"))
        assert capacity >= spec.replica_range[1], spec.name


def _plan(node_types: dict, replicas: int) -> dict:
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    spec = load_spec(NIGHTLY)
    demand = [{"CPU": spec.resources.num_cpus, "GPU": spec.resources.num_gpus}] * replicas
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    added, left = get_nodes_for(node_types, {}, "head", 100, demand, scorer)
    assert not left
    return dict(added)


def test_ray_autoscaler_prefers_spot_and_overflows_to_on_demand():
    types = yaml.safe_load(AWS.read_text())["available_node_types"]
    assert _plan(types, 8) == {"gpu_spot": 8}
    assert _plan(types, 10) == {"gpu_spot": 8, "gpu_ondemand": 2}
    # The preference is the `ondemand` marker resource, not the alphabetical tie-break.
    renamed = {"head": types["head"], "a_spot": types["gpu_spot"], "z_ondemand": types["gpu_ondemand"]}
    assert _plan(renamed, 3) == {"a_spot": 3}
    # Spot drought lever from cluster/README.md: spot max_workers 0, on-demand takes all.
    drought = copy.deepcopy(types)
    drought["gpu_spot"]["max_workers"], drought["gpu_ondemand"]["max_workers"] = 0, 8
    assert _plan(drought, 8) == {"gpu_ondemand": 8}


def test_kuberay_cluster_has_a_gpu_worker_group_with_the_replica_identity():
    path = ROOT / "cluster" / "kuberay.yaml"
    sa = one(path, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/illada-batch-replica")
    rc = one(path, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    assert head["serviceAccountName"] == pod["serviceAccountName"] == sa["metadata"]["name"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for spec in gpu_jobs():
        assert float(container["resources"]["requests"]["cpu"]) >= spec.resources.num_cpus, spec.name
        assert gpu["maxReplicas"] >= spec.replica_range[1], spec.name
    # The RayJob's worker pods carry the same toleration.
    rj_pod = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert rj_pod["tolerations"] == pod["tolerations"]

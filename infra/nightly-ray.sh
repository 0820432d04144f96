#!/usr/bin/env bash
# The nightly run on a plain Ray cluster (ray up cluster/aws.yaml): submit jobs/nightly.yaml
# for today's UTC date through Ray Job Submission, and return (the job runs on the cluster).
# Run by infra/illada-nightly.service (systemd timer) or cron; environment:
#   RAY_ADDRESS   the dashboard of the head, http://HEAD:8265 (required)
#   ILLADA_HOME   a checkout of this repository, for jobs/ (default /opt/illada)
#   ILLADA_VENV   the virtualenv with illada-batch installed (default $ILLADA_HOME/.venv)
#
# Exactly once per date: the submission id is illada-nightly-<date> (the same function that
# names the KubeRay RayJob), and Ray refuses a second submission with an id it has seen. So a
# timer that fires twice, or a manual rerun, exits 0 without starting a second run. To rerun a
# date on purpose, submit with another id: the run resumes from the committed shards.
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS=http://HEAD:8265 (cluster/README.md)}"
ILLADA_HOME="${ILLADA_HOME:-/opt/illada}"
PATH="${ILLADA_VENV:-$ILLADA_HOME/.venv}/bin:$PATH"
cd "$ILLADA_HOME"

SPEC=jobs/nightly.yaml
DATE="$(date -u +%F)"
ID="$(illada-batch render submission-id "$SPEC" --date "$DATE")"

if out="$(illada-batch submit "$SPEC" --address "$RAY_ADDRESS" --date "$DATE" --submission-id "$ID" 2>&1)"; then
  printf '%s\n' "$out"
  echo "submitted $ID"
  exit 0
else
  rc=$?
fi
printf '%s\n' "$out" >&2
if grep -qi "already exists" <<<"$out"; then
  echo "$ID was already submitted: nothing to do"
  exit 0
fi
exit "$rc"

"""The job's fingerprint: what makes two runs' outputs comparable (``JobSpec.fingerprint``).

Every spec field is in it but the declared ``TOKEN_NEUTRAL`` ones, so a new field is in it until
someone shows it cannot change a token (a test fails when a field is on neither side). A field
left unset (None) is left out, so a setting added later does not change the fingerprints of
outputs made before it.
"""

from __future__ import annotations

import hashlib
import json

# The fields that cannot change a token or an output column, left out of the fingerprint: a
# resume may change them. Where and how the job runs (output, replicas, resources, retries,
# timeouts, credentials); how rows are batched and cached in memory (a sample's tokens do not
# depend on its batch neighbours, nor on how many pages the budget holds: tests/test_engine.py
# and tests/test_block_cache.py hold it), nor on the prefill chunk (tests/test_block_causal.py), nor
# on how many ranks a replica is split over (tests/test_tensor_parallel.py); shard_rows (a resume checks each shard's rows
# instead); the exit code's error_budget. `prefix` enters as the hash of its text.
TOKEN_NEUTRAL = frozenset({
    "name", "base_dir", "output", "replicas", "resources", "shard_rows", "max_retries", "retry_backoff_s",
    "error_budget", "placement_timeout_s", "stall_warning_s", "model.storage_options", "input.storage_options",
    "engine.max_batch_size", "engine.kv_budget", "engine.tensor_parallel_size", "engine.prefill_chunk", "prefix",
})


def _without(d: dict, paths: frozenset[str], at: str = "") -> dict:
    """``d`` without the dotted ``paths`` and without unset (None) values."""
    return {k: _without(v, paths, f"{at}{k}.") if isinstance(v, dict) else v
            for k, v in d.items() if f"{at}{k}" not in paths and v is not None}


def fingerprint_of(dump: dict, sampling: dict, prefix_text: str) -> str:
    """16 hex digits over the spec's JSON ``dump`` less the token-neutral fields, its ``sampling``
    identity, and the prefix's text (from a file or not) as its hash."""
    parts = _without(dump, TOKEN_NEUTRAL)
    parts["sampling"] = _without(sampling, frozenset())
    parts["prefix"] = hashlib.sha256(prefix_text.encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

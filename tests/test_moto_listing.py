"""The scale benchmark's S3 server (``bench/moto_listing.py``) lists as moto does, page by page.

Random buckets (keys put, deleted, hidden behind delete markers in a versioned bucket) are
listed through moto's own ``list_objects``/``list_objects_v2`` and through the sorted index,
every page of every listing (prefix, delimiter, start-after, marker, continuation tokens,
page sizes 0 up), and the answers compared item for item; then the server the benchmark
starts answers a paginated boto3 listing as the plain moto server does."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("moto")

from moto.s3.models import FakeKey, S3Backend  # noqa: E402

from illada_batch.bench import moto_listing  # noqa: E402

NAMES = st.text(alphabet="ab/c", min_size=1, max_size=6)
QUERY_TEXT = st.one_of(st.none(), st.text(alphabet="ab/c", max_size=3))


def _bucket(backend: S3Backend, puts: list[str], deletes: list[str], versioned: bool):
    name = f"b-{uuid.uuid4().hex[:12]}"
    backend.create_bucket(name, "us-east-1")
    bucket = backend.get_bucket(name)
    bucket.keys = moto_listing._SortedKeyStore(bucket.keys)
    if versioned:
        backend.put_bucket_versioning(name, "Enabled")
    for key in puts:
        backend.put_object(name, key, key.encode())
    for key in deletes:
        backend.delete_object(name, key)  # versioned: a delete marker, else the key goes
    assert bucket.keys.names == sorted(dict.keys(bucket.keys))
    return bucket


def _names(items) -> list[str]:
    return [i.name if isinstance(i, FakeKey) else i for i in items]


def _v2_pages(backend, fn, bucket, prefix, delimiter, start_after, max_keys):
    pages, token = [], None
    while True:
        items, truncated, token = fn(backend, bucket, prefix, delimiter, token, start_after, max_keys)
        pages.append((_names(items), truncated, token))
        if not truncated or len(pages) > 50:
            return pages


def _v1_pages(backend, fn, bucket, prefix, delimiter, marker, max_keys):
    pages = []
    while True:
        keys, folders, truncated, marker = fn(backend, bucket, prefix, delimiter, marker, max_keys)
        pages.append((_names(keys), list(folders), truncated, marker))
        if not truncated or len(pages) > 50:
            return pages


@settings(max_examples=150, deadline=None)
@given(puts=st.lists(NAMES, max_size=25), deletes=st.lists(NAMES, max_size=6), versioned=st.booleans(),
       prefix=QUERY_TEXT, delimiter=st.sampled_from([None, "", "/", "a"]), start=QUERY_TEXT,
       max_keys=st.one_of(st.none(), st.integers(0, 7)))
def test_listings_equal_motos_own(puts, deletes, versioned, prefix, delimiter, start, max_keys):
    backend = S3Backend("us-east-1", "123456789012")
    bucket = _bucket(backend, puts, [d for d in deletes if d in puts or versioned], versioned)
    v2_size = 1000 if max_keys is None else max_keys
    ours = _v2_pages(backend, moto_listing.list_objects_v2, bucket, prefix, delimiter, start, v2_size)
    theirs = _v2_pages(backend, moto_listing._MOTO_LIST_OBJECTS_V2, bucket, prefix, delimiter, start, v2_size)
    assert ours == theirs
    ours = _v1_pages(backend, moto_listing.list_objects, bucket, prefix, delimiter, start, max_keys)
    theirs = _v1_pages(backend, moto_listing._MOTO_LIST_OBJECTS, bucket, prefix, delimiter, start, max_keys)
    assert ours == theirs


def test_the_benchmarks_server_pages_as_moto_does(s3):
    """Over HTTP: boto3's paginated ListObjectsV2 (prefix, delimiter, 7 keys a page) and s3fs's
    listing give the same answers from the benchmark's server as from the plain moto server."""
    import boto3
    from pipeline_support import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "illada_batch.bench.moto_listing", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from pipeline_support import S3Server

        ours = S3Server()
        ours.port, ours.url = port, f"http://127.0.0.1:{port}"
        ours.wait_listening(30)
        keys = [f"{top}/{sub}/k{i:02d}" for top in ("a", "b") for sub in ("x", "y") for i in range(12)] + ["a/z", "c"]
        answers = []
        for server in (s3, ours):
            client = boto3.client("s3", endpoint_url=server.url, aws_access_key_id="testing",
                                  aws_secret_access_key="testing", region_name="us-east-1")
            bucket = f"b-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            for k in keys:
                client.put_object(Bucket=bucket, Key=k, Body=k.encode())
            pages = []
            for query in ({}, {"Prefix": "a/"}, {"Delimiter": "/"}, {"Prefix": "a/", "Delimiter": "/"},
                          {"StartAfter": "a/y"}):
                for page in client.get_paginator("list_objects_v2").paginate(
                        Bucket=bucket, PaginationConfig={"PageSize": 7}, **query):
                    pages.append(([c["Key"] for c in page.get("Contents", [])],
                                  [p["Prefix"] for p in page.get("CommonPrefixes", [])], page["IsTruncated"]))
            pages.append(sorted(k.split("/", 1)[1] for k in server.fs().find(bucket)))
            answers.append(pages)
        assert answers[0] == answers[1]
        assert len(answers[1]) > 10  # several pages were compared
    finally:
        proc.terminate()
        proc.wait(10)


@settings(max_examples=300, deadline=None)
@given(when=st.datetimes(min_value=__import__("datetime").datetime(1970, 1, 2)),
       form=st.sampled_from(["%Y-%m-%dT%H:%M:%S.000Z", "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ",
                             "%Y-%m-%dT%H:%M:%S+00:00", "%a, %d %b %Y %H:%M:%S GMT"]),
       fmt=st.sampled_from(["iso8601", "iso8601_zeroed", "rfc822", "unixtimestamp"]))
def test_the_servers_timestamps_are_written_as_moto_writes_them(when, form, fmt):
    """The server writes a key's LastModified (moto's ISO text, parsed back and formatted) with
    the same text as moto's own serializer, whatever the form and the output format."""
    from moto.core import serialize

    text = when.strftime(form)
    theirs = serialize.TimestampSerializer("iso8601")._convert_timestamp_to_str(text, fmt)
    saved = serialize.parse_to_aware_datetime
    serialize.parse_to_aware_datetime = moto_listing.aware_datetime
    try:
        ours = serialize.TimestampSerializer("iso8601")._convert_timestamp_to_str(text, fmt)
    finally:
        serialize.parse_to_aware_datetime = saved
    assert ours == theirs

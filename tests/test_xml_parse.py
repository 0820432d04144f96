"""The driver's S3 responses parse as botocore parses them (``job/xml_parse.py``).

Random XML documents are drawn from the shapes of the S3 operations the job uses (listings,
deletes, tags, ...): any subset of a structure's members, in any order, repeated or empty,
flattened and wrapped lists, nested structures, unknown elements, texts of every kind; each
is parsed by aiobotocore's own parser and by ``FastRestXMLParser``, and the answers compared."""

from __future__ import annotations

import asyncio
import re
from xml.sax.saxutils import escape

import botocore.session
from aiobotocore.parsers import AioRestXMLParser
from hypothesis import given, settings
from hypothesis import strategies as st

from illada_batch.job.xml_parse import FastRestXMLParser

S3 = botocore.session.get_session().get_service_model("s3")
OPERATIONS = ["ListObjectsV2", "ListObjects", "ListObjectVersions", "DeleteObjects", "GetObjectTagging",
              "CopyObject", "CompleteMultipartUpload", "ListMultipartUploads", "GetBucketVersioning"]
NS = "http://s3.amazonaws.com/doc/2006-03-01/"
TEXT = st.one_of(st.text(alphabet=" ab/&<>'\"\té", max_size=6),
                 st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=8))
SCALARS = {
    "string": TEXT, "integer": st.integers(-10**12, 10**12).map(str), "long": st.integers(0, 10**15).map(str),
    "boolean": st.sampled_from(["true", "false", "True", "1", ""]),
    "timestamp": st.one_of(
        st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.000Z")),
        st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
        st.sampled_from(["2026-12-07T05:01:02Z", "2026-12-07T05:01:02+00:00", "Mon, 07 Dec 2026 05:01:02 GMT"])),
}


def _xml_name(shape, name):
    return shape.serialization.get("name", name)


def _element(draw, shape, tag, depth):
    kind = shape.type_name
    if kind in SCALARS or kind == "blob":
        text = draw(SCALARS.get(kind, st.just("")))
        return f"<{tag}/>" if text == "" and draw(st.booleans()) else f"<{tag}>{escape(text)}</{tag}>"
    if kind == "structure":
        return f"<{tag}>{_children(draw, shape, depth + 1)}</{tag}>"
    if kind == "list":
        member_tag = shape.member.serialization.get("name", "member")
        items = "".join(_element(draw, shape.member, member_tag, depth + 1)
                        for _ in range(draw(st.integers(0, 2 if depth < 3 else 0))))
        return f"<{tag}>{items}</{tag}>"
    return f"<{tag}>x</{tag}>"


def _children(draw, shape, depth):
    parts = []
    body = [(n, m) for n, m in shape.members.items() if m.serialization.get("location") is None]
    for name, member in draw(st.lists(st.sampled_from(body), max_size=6 if depth < 3 else 0)) if body else []:
        if member.type_name == "list" and member.serialization.get("flattened"):
            tag = member.member.serialization.get("name", _xml_name(member, name))
            parts += [_element(draw, member.member, tag, depth) for _ in range(draw(st.integers(1, 3)))]
        else:
            parts.append(_element(draw, member, _xml_name(member, name), depth))
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), "<NotInTheModel>y</NotInTheModel>")
    return "".join(parts)


@st.composite
def responses(draw):
    shape = S3.operation_model(draw(st.sampled_from(OPERATIONS))).output_shape
    root = shape.serialization.get("name", shape.name)
    body = f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{NS}">{_children(draw, shape, 0)}</{root}>'
    return shape, body.encode()


def _plain(value):
    """An answer with XML elements (botocore hands a repeated scalar's elements back as they
    are) as (tag, text, children), so that two parses of one body compare."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "tag") and hasattr(value, "text"):
        return (value.tag, value.text, [_plain(c) for c in value])
    return value


def _parse(parser_class, shape, body):
    response = {"body": body, "headers": {"x-amz-request-id": "r"}, "status_code": 200,
                "context": {"operation_name": shape.name}}
    try:
        return _plain(asyncio.run(parser_class().parse(response, shape)))
    except Exception as exc:  # noqa: BLE001 - a text that does not parse: both must refuse it alike
        return ("raised", type(exc).__name__, re.sub(r" at 0x[0-9a-f]+", "", str(exc)))


@settings(max_examples=400, deadline=None)
@given(responses())
def test_an_s3_response_parses_as_botocore_parses_it(response):
    shape, body = response
    assert _parse(FastRestXMLParser, shape, body) == _parse(AioRestXMLParser, shape, body)


def test_an_s3_error_parses_as_botocore_parses_it():
    shape = S3.operation_model("ListObjectsV2").output_shape
    body = b"<Error><Code>NoSuchBucket</Code><Message>The bucket does not exist</Message></Error>"
    response = {"body": body, "headers": {}, "status_code": 404, "context": {"operation_name": "ListObjectsV2"}}
    ours = asyncio.run(FastRestXMLParser().parse(dict(response), shape))
    assert ours == asyncio.run(AioRestXMLParser().parse(dict(response), shape))
    assert ours["Error"]["Code"] == "NoSuchBucket"

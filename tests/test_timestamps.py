"""``job/timestamps.py``: S3's ISO 8601 timestamps read without dateutil give the datetime
botocore's own parser gives; every other form (RFC 822 headers, epochs, nonsense) is botocore's."""

from __future__ import annotations

import datetime

from botocore import parsers
from botocore.utils import parse_timestamp
from hypothesis import given
from hypothesis import strategies as st

from illada_batch.job import timestamps


def _same(text: str) -> None:
    try:
        want = parse_timestamp(text)
    except ValueError:
        want = ValueError
    try:
        got = timestamps.parse(text)
    except ValueError:
        got = ValueError
    assert got == want, text
    if want is not ValueError:
        assert got.utcoffset() == want.utcoffset()


@given(st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1)),
       st.integers(0, 6))
def test_s3s_form_reads_as_botocore_reads_it(when, digits):
    fraction = f".{when.microsecond:06d}"[:digits + 1] if digits else ""
    _same(when.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z")


@given(st.one_of(st.from_regex(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?Z?", fullmatch=True),
                 st.datetimes(min_value=datetime.datetime(1970, 1, 2)).map(
                     lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT")),
                 st.integers(0, 2 ** 31).map(str), st.text(max_size=12)))
def test_every_other_form_is_botocores(text):
    _same(text)


def test_installed_it_is_the_parser_botocore_makes(monkeypatch):
    monkeypatch.setattr(parsers, "DEFAULT_TIMESTAMP_PARSER", parsers.DEFAULT_TIMESTAMP_PARSER)
    timestamps.install()
    assert parsers.create_parser("rest-xml")._timestamp_parser is timestamps.parse

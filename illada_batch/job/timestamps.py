"""botocore's timestamps, parsed fast where they are S3's ISO 8601.

botocore parses every timestamp of a response with ``dateutil`` (about 50 us each): a listing
of 10^5 keys carries 10^5 ``LastModified`` values, so a resume or ``status`` at 10^5 shards
spent most of its listing CPU there (profiled at 10^4 shards on the S3 server: 28 of the
fsspec thread's 39 s of listing). S3 writes them as ``2026-12-07T05:01:02.000Z``: this module
reads that form directly, into the datetime botocore's parser returns (the same instant, in
UTC; dateutil names UTC ``tzlocal()`` on a machine whose zone is UTC, ``tzutc()`` elsewhere:
this says ``tzutc()``), and hands any other form to botocore's parser. ``install()`` makes
it botocore's default for parsers made from then on (in this process: the driver, ``status``,
a replica); ``tests/test_timestamps.py`` holds the two parsers equal.
"""

from __future__ import annotations

import datetime
import re

from botocore import parsers
from botocore.utils import parse_timestamp
from dateutil.tz import tzutc

_S3_FORM = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?Z\Z")
_UTC = tzutc()


def parse(value):
    """``botocore.utils.parse_timestamp(value)``, without dateutil for S3's form (the keys of a
    listing mostly share their second: a text seen lately is not parsed again)."""
    if not isinstance(value, str):
        return parse_timestamp(value)
    seen = _SEEN.get(value)
    if seen is not None:
        return seen
    match = _S3_FORM.match(value)
    if match is None:
        return parse_timestamp(value)
    *parts, fraction = match.groups()
    try:
        when = datetime.datetime(*map(int, parts), int((fraction or "0").ljust(6, "0")), tzinfo=_UTC)
    except ValueError:  # out of range (month 13): botocore's parser says it its way
        return parse_timestamp(value)
    if len(_SEEN) >= 4096:
        _SEEN.clear()
    _SEEN[value] = when  # a datetime cannot change: one object serves every key that has the text
    return when


_SEEN: dict[str, datetime.datetime] = {}


def install() -> None:
    """Response parsers created from now on use ``parse`` (botocore's documented default)."""
    parsers.DEFAULT_TIMESTAMP_PARSER = parse

"""S3's XML responses, parsed as botocore parses them, with each structure's plan made once.

botocore parses every structure of a response (each key of an S3 listing is one) by walking
all of its shape's members and working out each one's XML name, location and handler anew,
then each text field through three layers of handlers: about 55 us a key. A listing of 10^5
keys is then 5 s of CPU, and a resume at 10^5 shards lists about 450,000 keys (its start
lists ``_manifest/``, ``_attempts/`` and ``data/``; its summary lists them again, full).

``FastRestXMLParser._handle_structure`` does what botocore's does with the plan (XML name,
member name, shape, handler) cached per shape, and reads a member whose handler is one of
botocore's plain ones as that handler does: the element's text (``''`` when empty) as it is
(a string that is not a JSON header), through ``int`` (integer, long) or through the
parser's timestamp parser, and a flattened list of such strings as the list of their texts
(S3's ``ChecksumAlgorithm``). Every other member goes to botocore's own handler.
Structures that botocore treats specially (errors, tagged unions, XML attributes) go to
botocore's code whole. ``install()`` makes it aiobotocore's ``rest-xml`` parser (s3fs's)
for responses parsed from then on, in this process; ``tests/test_xml_parse.py`` holds its
answers equal to botocore's. A 1,000-key listing page: 22 -> 11 ms of CPU here.
"""

from __future__ import annotations

from aiobotocore import parsers as aio_parsers
from botocore import parsers as bc_parsers
from botocore.utils import is_json_value_header

# a plan's handler slot for botocore's plain handlers: the element's text as it is, as an int,
# or through the parser's timestamp parser
_TEXT, _INT, _TIME, _TEXTS = object(), object(), object(), object()


class FastRestXMLParser(aio_parsers.AioRestXMLParser):
    _plans: dict[int, tuple] = {}  # id(shape) -> (shape, plan or None); the shape is kept, so its id stays its own
    _tags: dict[str, str] = {}  # an element's tag -> its name without the namespace (botocore's ``_node_tag``)

    def _handle_structure(self, shape, node):
        plan = self._plan(shape)
        if plan is None or isinstance(node, list):
            return super()._handle_structure(shape, node)
        found, tags = {}, self._tags
        for child in node:
            tag = tags.get(child.tag)
            if tag is None:
                tag = self._node_tag(child)
                if len(tags) < 4096:
                    tags[child.tag] = tag
            seen = found.get(tag)
            if seen is None:
                found[tag] = child
            elif isinstance(seen, list):
                seen.append(child)
            else:
                found[tag] = [seen, child]
        parsed = {}
        for xml_name, member_name, member_shape, handler in plan:
            member_node = found.get(xml_name)
            if member_node is None:
                continue
            if handler is _TEXTS:
                items = member_node if isinstance(member_node, list) else (member_node,)
                parsed[member_name] = ["" if item.text is None else item.text for item in items]
                continue
            if isinstance(member_node, list) or handler not in _PLAIN:
                parsed[member_name] = (self._parse_shape if handler in _PLAIN else handler.__get__(self))(
                    member_shape, member_node)
                continue
            text = member_node.text
            text = "" if text is None else text
            parsed[member_name] = text if handler is _TEXT else int(text) if handler is _INT else \
                self._timestamp_parser(text)
        return parsed

    def _plan(self, shape):
        """[(XML name, member name, member shape, handler)] in the shape's member order, or None
        where botocore's ``_handle_structure`` has cases of its own."""
        cached = self._plans.get(id(shape))
        if cached is not None and cached[0] is shape:
            return cached[1]
        plan = None
        members = shape.members
        if not (shape.metadata.get("exception", False) or getattr(shape, "is_tagged_union", False) or any(
                m.serialization.get("xmlAttribute") for m in members.values())):
            plan = []
            for name, member in members.items():
                if member.serialization.get("location") in self.KNOWN_LOCATIONS or \
                        member.serialization.get("eventheader"):
                    continue
                handler = getattr(type(self), f"_handle_{member.type_name}", type(self)._default_handle)
                if handler is _STRING_HANDLER and not is_json_value_header(member):
                    handler = _TEXT
                elif handler in _OF_PLAIN:
                    handler = _OF_PLAIN[handler]
                elif handler is _LIST_HANDLER and member.serialization.get("flattened") and \
                        getattr(type(self), f"_handle_{member.member.type_name}", None) is _STRING_HANDLER and \
                        not is_json_value_header(member.member):
                    handler = _TEXTS
                plan.append((self._member_key_name(member, name), name, member, handler))
            plan = tuple(plan)
        self._plans[id(shape)] = (shape, plan)
        return plan


_STRING_HANDLER = aio_parsers.AioRestXMLParser._handle_string  # the text, then BaseRestParser's (JSON headers)
_OF_PLAIN = {bc_parsers.BaseXMLResponseParser._handle_integer: _INT,
             bc_parsers.BaseXMLResponseParser._handle_timestamp: _TIME}
_PLAIN = (_TEXT, _INT, _TIME)
_LIST_HANDLER = aio_parsers.AioRestXMLParser._handle_list  # a header list, else one element made a list


def install() -> None:
    """s3fs's responses parsed from now on (in this process) go through ``FastRestXMLParser``."""
    aio_parsers.PROTOCOL_PARSERS["rest-xml"] = FastRestXMLParser

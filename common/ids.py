"""The id contract: what every id the API accepts (user, device, session, item, request) may hold.

Ids are embedded in Redis keys, stream entries and Parquet, so one definition bounds them all:
1-128 characters that neither start nor end with a space; control characters (NUL, ESC, newlines,
...), invisible format characters (bidi overrides, zero-width joiners) and separators other than the
space are refused. The rule is one regular expression, so the OpenAPI document states exactly what
is accepted and a client can check an id before sending it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

ID_MAX_LENGTH = 128

# Unicode 14's (Python 3.11's) control, format and separator characters but the space: categories Cc,
# Cf, Zl, Zp and Zs. Literal characters, so that any regex dialect reads the class; a test recomputes it.
# Surrogates need no place: UTF-8 and JSON text cannot carry a lone one. Private-use and unassigned
# characters are allowed: they break nothing, and listing them would make the class thousands of ranges.
NOT_PRINTABLE = (
    "\x00-\x1f\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u1680\u180e\u2000-\u200f"
    "\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
ID_PATTERN = f"^[^{NOT_PRINTABLE} ](?:[^{NOT_PRINTABLE}]*[^{NOT_PRINTABLE} ])?$"
_ID_RE = re.compile(ID_PATTERN)


def printable_id(value: str) -> str:
    # Most ids are ASCII, where str.isprintable refuses exactly the class's ASCII part (\x00-\x1f,
    # \x7f) at a third of the regex's cost; this runs for every id of every event, in the API and the
    # consumer alike.
    if value and value.isascii() and value.isprintable() and value[0] != " " and value[-1] != " ":
        return value
    if not _ID_RE.fullmatch(value):  # fullmatch: `$` alone would let a final newline through
        raise ValueError(
            f"must be 1-{ID_MAX_LENGTH} printable characters, without control characters or surrounding spaces"
        )
    return value


Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ID_MAX_LENGTH),
    AfterValidator(printable_id),
    # Stated in the schema too (validation keeps the readable message above).
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": ID_MAX_LENGTH, "pattern": ID_PATTERN}),
]


# Remembered: the speed consumer looks up the tombstone and withdrawal keys of every person of every
# batch (3.4 digests an event when visitors' events interleave, ~0.9 µs each), the same people again and again.
@functools.lru_cache(maxsize=1 << 15)
def id_digest(value: str) -> str:
    """A pseudonym of an id for what must outlive the id itself (erasure tombstones and records): it
    recognises the id when it comes back without storing it."""
    return hashlib.sha256(value.encode()).hexdigest()[:24]

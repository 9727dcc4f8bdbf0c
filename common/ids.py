"""The id contract: what every id the API accepts (user, device, session, item, request) may hold.

Ids are embedded in Redis keys, stream entries and Parquet, so one definition bounds them all:
1-128 printable characters after surrounding whitespace is stripped; control characters (NUL, ESC,
newlines, ...) and other non-printable ones (format, separators, unassigned) are refused.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

ID_MAX_LENGTH = 128


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError(f"must be 1-{ID_MAX_LENGTH} printable characters, without control characters")
    return value


Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ID_MAX_LENGTH, strip_whitespace=True),
    AfterValidator(_printable),
]


def id_digest(value: str) -> str:
    """A pseudonym of an id for what must outlive the id itself (erasure tombstones and records): it
    recognises the id when it comes back without storing it."""
    return hashlib.sha256(value.encode()).hexdigest()[:24]

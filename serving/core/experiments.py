"""Deterministic experiment assignment: a person's variant is a pure function of their id and the shares."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# Changing the salt reshuffles everyone; keep it fixed for the life of an experiment.
SALT = "lambdarec-exp-1"


def bucket(person_id: str) -> float:
    """A uniform number in [0, 1) fixed for the person."""
    digest = hashlib.sha256(f"{SALT}:{person_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_variant(person_id: str, shares: Mapping[str, float]) -> str:
    """The variant whose cumulative share interval holds the person's bucket (variants in name order)."""
    point = bucket(person_id)
    cumulative = 0.0
    ordered = sorted(shares.items())
    for name, share in ordered:
        cumulative += share
        if point < cumulative:
            return name
    return ordered[-1][0]  # float rounding at the top end

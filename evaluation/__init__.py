"""Evaluation of the whole system on recorded traffic: `recs evaluate replay` (composes every layer)."""

"""Serving layer: the FastAPI ranker that merges batch and speed state at request time."""

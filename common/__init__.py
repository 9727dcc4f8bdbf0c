"""Shared contracts of every layer: settings, events, lake, Redis keys, registry, features."""

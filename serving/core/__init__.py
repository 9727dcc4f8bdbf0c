"""Serving internals: configuration, model holder, rules, experiments, ranking and impression logging."""

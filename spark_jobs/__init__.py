"""Batch layer: interactions, ALS training (Spark or implicit), ranker training, evaluation."""

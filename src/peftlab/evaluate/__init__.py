"""Evaluation: label-word scoring and classification metrics."""

"""Evaluation: zero-shot classification, retrieval, linear probes."""

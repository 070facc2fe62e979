"""Evaluations of trained models: needle-in-a-haystack retrieval (needle.py)."""

"""Proof and measurement on top of the public API: compare, bench, demo."""

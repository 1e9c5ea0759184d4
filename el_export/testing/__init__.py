"""Seeded tiny checkpoints for the tests and the demos."""

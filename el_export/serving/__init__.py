"""Serving bundles through Triton."""

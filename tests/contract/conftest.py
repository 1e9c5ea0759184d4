"""Helpers of the contract tests."""

import json


def edit_manifest(bundle, change):
    """Apply `change` to a bundle's manifest JSON in place (the files' hashes are left as they were)."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))

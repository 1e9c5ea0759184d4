"""Fixtures of the serving tests that more than one module uses."""

import pytest


@pytest.fixture(scope="session")
def whisper_bundle(tmp_path_factory):
    """A tiny Whisper whose encoder takes 30 s of audio (3000 frames), so audio goes in whole."""
    from el_export.export import export_model
    from el_export.testing.tiny import tiny_model

    out = tmp_path_factory.mktemp("whisper") / "bundle"
    export_model(tiny_model("whisper", seed=0, max_source_positions=1500), out, mode="el", progress=False)
    return out

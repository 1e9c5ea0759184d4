"""Shared fixtures: seeded tiny models of every family, exported once per session."""

import pytest
import torch

from el_export.export import export_model
from el_export.tiny import tiny_model


@pytest.fixture(scope="session")
def hf_models():
    """family -> seeded tiny HF model (built on first use)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_model(family, seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, hf_models):
    """(family, mode) -> bundle directory exported from the tiny model (exported on first use)."""
    cache = {}

    def get(family: str, mode: str):
        if (family, mode) not in cache:
            out = tmp_path_factory.mktemp("bundles") / f"{family}-{mode}"
            export_model(hf_models(family), out, mode=mode, progress=False)
            cache[family, mode] = out
        return cache[family, mode]

    return get


@pytest.fixture
def padded_batch():
    """3 inputs of different lengths, right-padded with the model's pad id, and their mask."""

    def make(model, lengths=(11, 7, 3)):
        pad = model.config.pad_token_id
        g = torch.Generator().manual_seed(1)
        S = max(lengths)
        ids = torch.randint(3, model.config.vocab_size, (len(lengths), S), generator=g)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids[mask == 0] = pad
        return ids, mask

    return make

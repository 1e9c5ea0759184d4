"""A running batch: inputs join a decoder at step boundaries (`merge`) and leave it (`reorder` with the inputs kept),
so its rows sit at different steps. Each input's logits equal that input decoded alone, on every backend."""

import pytest
import torch

import el_export
from el_export.export import export_model
from el_export.runtime.torch import StaticCacheDecoder, load_torch
from el_export.testing.tiny import tiny_model
from el_export.tolerance import graph_close

K = 2  # rows per input: every per-input tensor (EL's encoder output, GPT-2's prompt) is read by k rows
BACKENDS = ["onnxruntime", "torch", "torch-static"]
CASES = [
    (family, mode, backend)
    for family in ("bart", "t5", "whisper", "gpt2")
    for mode in ("el", "kv")
    for backend in BACKENDS
    if not (family == "gpt2" and backend == "torch-static")  # static caches are for encoder-decoders
]


# The shared tiny T5 (init factor 4) saturates its self-attention: its relative bias barely reaches the logits, so a
# cache padded on the wrong side would pass. At factor 2 it shows (test_t5_sees_where_the_padding_is).
SHARP = {"t5": {"initializer_factor": 2.0}}


@pytest.fixture(scope="module")
def models(hf_models):
    cache = {}

    def get(family: str):
        if family not in SHARP:
            return hf_models(family)
        if family not in cache:
            cache[family] = tiny_model(family, seed=0, **SHARP[family])
        return cache[family]

    return get


@pytest.fixture(scope="module")
def sharp_bundles(bundles, models, tmp_path_factory):
    cache = {}

    def get(family: str, mode: str):
        if family not in SHARP:
            return bundles(family, mode)
        if (family, mode) not in cache:
            out = tmp_path_factory.mktemp("sharp") / f"{family}-{mode}"
            export_model(models(family), out, mode=mode, progress=False)
            cache[family, mode] = out
        return cache[family, mode]

    return get


@pytest.fixture
def generator(request, sharp_bundles, models, monkeypatch):
    family, mode, backend = request.param
    if backend == "onnxruntime":
        return el_export.load(sharp_bundles(family, mode))
    monkeypatch.setattr(StaticCacheDecoder, "CAPACITY", 4)  # static caches fill and grow mid-test, merged or not
    return load_torch(models(family), mode=mode, static_cache=backend == "torch-static")


class Inputs:
    """Seeded inputs of one family, each of its own source (or prompt) length, and a started decoder over any of
    them: the context the generator hands `make_decoder`, built from the same graphs."""

    def __init__(self, generator, seed: int = 0):
        self.generator, self.manifest = generator, generator.manifest
        self.g = torch.Generator().manual_seed(seed)
        self.vocab = self.manifest.dims["vocab_size"]

    def make(self, length: int, padding: int = 0) -> dict:
        """One input: `length` source (or prompt) tokens of which the first `padding` are padding (left-padded
        prompts for decoder-only models, right-padded sources otherwise), or random features for speech."""
        if self.manifest.audio:  # Whisper: 30 s of (tiny) features, a fixed source length
            mels = self.manifest.audio["n_mels"]
            return {"input_features": torch.randn(1, mels, 80, generator=self.g)}
        ids = torch.randint(3, self.vocab, (1, length), generator=self.g)
        mask = torch.ones_like(ids)
        if self.manifest.kind == "decoder-only":
            mask[:, :padding] = 0
        elif padding:
            mask[:, length - padding :] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def decoder(self, inputs: list[dict], decoder_prompt: int = 1):
        """A decoder started on `inputs` (padded into one batch), and its first logits [B * K, V]. Encoder-decoders
        get a decoder prompt of `decoder_prompt` tokens (the start token, then fixed ids)."""
        batch = {name: _pad_cat([i[name] for i in inputs], left=self.manifest.kind == "decoder-only")
                 for name in inputs[0]}  # fmt: skip
        backend = self.generator.backend
        if self.manifest.kind == "decoder-only":
            prefill = backend.run("prefill", batch)
            mask = batch["attention_mask"]
            context = {**prefill, "prompt_mask": mask, "position_ids": mask.sum(dim=1, keepdim=True)}
            prompt = batch["input_ids"]
        else:
            encoded = self.generator.encode(batch)
            B, S = encoded["encoder_hidden"].shape[:2]
            mask = batch.get("attention_mask", torch.ones(B, S, dtype=torch.int64))
            context = {**encoded, "encoder_mask": mask}
            start = self.manifest.special_tokens["decoder_start_token_id"]
            prompt = torch.tensor([[start, *range(5, 4 + decoder_prompt)]] * B)
        decoder = backend.make_decoder(context)
        return decoder, decoder.start(prompt, K)


def _pad_cat(tensors: list[torch.Tensor], left: bool) -> torch.Tensor:
    """[1, S_i] tensors -> [B, max S_i], zero-padded (masks then mark the padding)."""
    if tensors[0].dim() != 2:
        return torch.cat(tensors)
    S = max(t.shape[1] for t in tensors)
    pad = [(S - t.shape[1], 0) if left else (0, S - t.shape[1]) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, p) for t, p in zip(tensors, pad, strict=True)])


def _assert_same(got: torch.Tensor, expected: torch.Tensor, d_model: int, what: str) -> None:
    """Logits within the graphs' float32 tolerance, and the same greedy token on every row."""
    close = graph_close(got.cpu().numpy(), expected.cpu().numpy(), "float32", width=d_model)
    assert close.ok, f"{what}: {close}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1)), what


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1, keepdim=True)


@pytest.mark.parametrize("generator", CASES, indirect=True, ids=["-".join(c) for c in CASES])
def test_input_admitted_mid_run_decodes_as_alone(generator):
    """X decodes input a for 3 steps; Y starts input b (other source or prompt length, longer decoder prompt); b
    joins X's batch. Both inputs' next 4 logits equal those of each input decoded alone."""
    inputs = Inputs(generator)
    a, b = inputs.make(7), inputs.make(4, padding=1)
    d = generator.manifest.dims["d_model"]
    x, logits = inputs.decoder([a])
    alone_a, _ = inputs.decoder([a])
    for _ in range(3):
        tokens = _greedy(logits)
        logits = x.step(tokens)
        alone_a.step(tokens)
    y, logits_b = inputs.decoder([b], decoder_prompt=3)
    alone_b, _ = inputs.decoder([b], decoder_prompt=3)
    x.merge(y)
    assert (x.rows, x.inputs) == (2 * K, 2)
    logits = torch.cat([logits, logits_b])
    for step in range(4):
        tokens = _greedy(logits)
        logits = x.step(tokens)
        _assert_same(logits[:K], alone_a.step(tokens[:K]), d, f"input a, step {step}")
        _assert_same(logits[K:], alone_b.step(tokens[K:]), d, f"input b (joined), step {step}")


@pytest.mark.parametrize("generator", CASES, indirect=True, ids=["-".join(c) for c in CASES])
def test_input_dropped_mid_run_leaves_the_others_unchanged(generator):
    """A batch of 3 inputs at different steps (a ran 2 steps before b and c joined); the middle one (b) leaves
    after 2 more steps; a's and c's next 3 logits equal the same batch's without the drop."""
    inputs = Inputs(generator, seed=1)
    a, b, c = inputs.make(5), inputs.make(8, padding=2), inputs.make(3)
    d = generator.manifest.dims["d_model"]

    def batch_of_three():
        decoder, logits = inputs.decoder([a])
        for _ in range(2):
            logits = decoder.step(_greedy(logits))
        joined, logits_bc = inputs.decoder([b, c], decoder_prompt=2)
        decoder.merge(joined)
        logits = torch.cat([logits, logits_bc])
        for _ in range(2):
            logits = decoder.step(_greedy(logits))
        return decoder, logits

    (dropping, logits), (full, _) = batch_of_three(), batch_of_three()
    kept_rows = torch.cat([torch.arange(K), torch.arange(2 * K, 3 * K)])  # a's rows, c's rows
    dropping.reorder(kept_rows, torch.tensor([0, 2]))
    assert (dropping.rows, dropping.inputs) == (2 * K, 2)
    logits = logits[kept_rows]
    for step in range(3):
        tokens = _greedy(logits)
        logits = dropping.step(tokens)
        everyone = torch.zeros(3 * K, 1, dtype=torch.int64)
        everyone[kept_rows] = tokens  # b's rows are fed a token too; they are what was dropped
        _assert_same(logits, full.step(everyone)[kept_rows], d, f"step {step} after the drop")


@pytest.mark.parametrize("mode", ["el", "kv"])
def test_t5_sees_where_the_padding_is(mode, models):
    """The relative bias reads cache-index distance: the same cache padded after its entries instead of before
    changes the logits far past tolerance. What makes the admission tests able to catch a cache padded on the
    wrong side."""
    inputs = Inputs(load_torch(models("t5"), mode=mode))
    b = inputs.make(4)
    left, logits = inputs.decoder([b], decoder_prompt=3)
    right, _ = inputs.decoder([b], decoder_prompt=3)
    for decoder, pad in ((left, (1, 0)), (right, (0, 1))):
        for name, tensor in decoder.state.items():
            if name.startswith("past_"):  # [N, t] mask, [N, t, d] EL or [N, h, t, dh] K/V caches
                time_axis = 1 if name == "past_mask" or mode == "el" else 2
                decoder.state[name] = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1 - time_axis) + pad)
    tokens = _greedy(logits)
    got, expected = right.step(tokens), left.step(tokens)
    assert not graph_close(got.numpy(), expected.numpy(), "float32", width=32).ok

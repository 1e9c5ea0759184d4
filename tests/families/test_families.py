"""Families map HF checkpoints onto the shared blocks exactly, and refuse what they cannot express."""

import pytest
import torch

from el_export.errors import CheckpointError, UnsupportedModelError
from el_export.families import build_from_hf, family_for, supported_config_names
from el_export.testing.tiny import DECODER_ONLY, FAMILIES, SPEECH, tiny_model
from el_export.tolerance import BLOCK_TOLERANCE


def test_every_registered_family_has_a_tiny_test_model():
    import transformers

    registered = {family_for(getattr(transformers, name)()).name for name in supported_config_names()}
    tested = {family_for(tiny_model(label).config).name for label in FAMILIES + DECODER_ONLY + SPEECH}
    assert registered <= tested, f"families without a tiny test model: {registered - tested}"


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_and_steps_match_hf_forward(family, padded_batch):
    hf = tiny_model(family)
    model, _ = build_from_hf(hf)
    ids, mask = padded_batch(hf)
    decoder_ids = torch.randint(3, hf.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        memory = model.encoder(ids, mask)
        peak = ref.logits.abs().max()
        assert (memory - ref.encoder_last_hidden_state).abs().max() <= BLOCK_TOLERANCE * max(
            1, ref.encoder_last_hidden_state.abs().max()
        )
        for mode in ("el", "kv"):
            k = 2  # two rows per input, as beams
            rows = decoder_ids.repeat_interleave(k, 0)
            if mode == "el":  # per-layer caches of layer inputs; the encoder output once per input
                state, context, m = [torch.zeros(6, 0, 32)] * 2, memory, mask
                step = model.step_el
            else:  # per-layer K and V; cross K/V repeated per row
                state = [torch.zeros(6, 4, 0, 8)] * 4
                context = [t.repeat_interleave(k, 0) for t in model.cross_keys_values(memory)]
                m = mask.repeat_interleave(k, 0)
                step = model.step_kv
            for t in range(rows.shape[1]):
                past_mask = torch.ones(rows.shape[0], t, dtype=torch.int64)  # every cache entry a real token
                logits, state = step(rows[:, t : t + 1], context, m, past_mask, state)
                expected = ref.logits[:, t].repeat_interleave(k, 0)
                assert (logits - expected).abs().max() <= 5e-5 * peak, (mode, t)


def test_rotary_model_is_refused_with_the_reason():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="rotary position embeddings"):
        family_for(LlamaConfig())


def test_unknown_architecture_lists_supported_families():
    from transformers import BertConfig

    with pytest.raises(UnsupportedModelError, match="not supported.*bart"):
        family_for(BertConfig())


def test_checkpoint_with_missing_weights_lists_them():
    hf = tiny_model("bart")
    state = hf.state_dict()
    hf.state_dict = lambda: {k: v for k, v in state.items() if "fc1" not in k}
    with pytest.raises(CheckpointError, match="missing the weight for encoder.layers.0.fc1.weight"):
        build_from_hf(hf)

"""Whisper: an audio encoder (two convolutions over log-mel frames) and a BART-like pre-norm decoder.

Speech recognition is where EL-attention pays most: the decoder cross-attends to 1500 encoder frames
with 5 beams, and the K/V baseline keeps 2 x layers x beams copies of them. HF's key projections have
no bias; the shared blocks' zero bias is exact (and EL drops key biases anyway).
"""

import torch

from el_export.families import Family, register
from el_export.model.layers import LayerSpec
from el_export.model.models import ModelSpec, Seq2SeqLM


def spec_from_config(config) -> ModelSpec:
    def layer(heads: int, ffn: int) -> LayerSpec:
        d = config.d_model
        return LayerSpec(d_model=d, n_heads=heads, d_head=d // heads, d_ffn=ffn, activation=config.activation_function,
                         pre_norm=True)  # fmt: skip

    return ModelSpec(
        family="whisper",
        encoder=layer(config.encoder_attention_heads, config.encoder_ffn_dim),
        decoder=layer(config.decoder_attention_heads, config.decoder_ffn_dim),
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        vocab_size=config.vocab_size,
        max_positions=config.max_target_positions,
        final_layer_norm=True,
        n_mels=config.num_mel_bins,
        encoder_positions=config.max_source_positions,
    )


def weight(state: dict, key: str):
    if key == "lm_head.weight":  # proj_out, tied to the token embedding
        return state.get("proj_out.weight", state.get("model.decoder.embed_tokens.weight"))
    tensor = state.get("model." + key)
    if tensor is None and key.endswith("k_proj.bias"):  # HF has no key bias: an exact zero
        out = state.get("model." + key.replace("k_proj.bias", "k_proj.weight"))
        return None if out is None else torch.zeros(out.shape[0], dtype=out.dtype)
    return tensor


register("WhisperConfig")(
    Family("whisper", "seq2seq", spec_from_config, Seq2SeqLM, weight, auto_model="AutoModelForSpeechSeq2Seq")
)

"""BART-like encoder-decoders: BART, mBART, Marian, Pegasus. One implementation, per-family options.

| family  | norm  | positions          | layernorm_embedding | final layer norm |
| BART    | post  | learned, offset 2  | yes                 | no               |
| mBART   | pre   | learned, offset 2  | yes                 | yes              |
| Marian  | post  | sinusoidal table   | no                  | no               |
| Pegasus | pre   | sinusoidal table   | no                  | yes              |
Sinusoidal tables are read from the HF module like learned ones: a table is a table.
"""

import math

from el_export.errors import UnsupportedModelError
from el_export.families import Family, register
from el_export.model.layers import LayerSpec
from el_export.model.models import ModelSpec, Seq2SeqLM

_OPTIONS = {  # model_type -> (pre_norm, position_offset, layernorm_embedding, final_layer_norm)
    "bart": (False, 2, True, False),
    "mbart": (True, 2, True, True),
    "marian": (False, 0, False, False),
    "pegasus": (True, 0, False, True),
}


def spec_from_config(config) -> ModelSpec:
    pre_norm, offset, layernorm_embedding, final_layer_norm = _OPTIONS[config.model_type]
    for heads in (config.encoder_attention_heads, config.decoder_attention_heads):
        if config.d_model % heads:
            raise UnsupportedModelError(
                f"{config.model_type}: d_model {config.d_model} is not a multiple of {heads} heads"
            )

    def layer(heads: int, ffn: int) -> LayerSpec:
        return LayerSpec(
            d_model=config.d_model,
            n_heads=heads,
            d_head=config.d_model // heads,
            d_ffn=ffn,
            activation=config.activation_function,
            pre_norm=pre_norm,
        )

    vocab = config.vocab_size
    decoder_vocab = getattr(config, "decoder_vocab_size", None) or vocab
    if config.model_type == "marian" and getattr(config, "share_encoder_decoder_embeddings", True):
        decoder_vocab = vocab
    return ModelSpec(
        family=config.model_type,
        encoder=layer(config.encoder_attention_heads, config.encoder_ffn_dim),
        decoder=layer(config.decoder_attention_heads, config.decoder_ffn_dim),
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        vocab_size=decoder_vocab,
        encoder_vocab_size=vocab,
        max_positions=config.max_position_embeddings,
        position_offset=offset,
        embed_scale=math.sqrt(config.d_model) if config.scale_embedding else 1.0,
        layernorm_embedding=layernorm_embedding,
        final_layer_norm=final_layer_norm,
        final_logits_bias=True,
    )


def weight(state: dict, key: str):
    """Our names are BART's, under `model.` except the LM head and its bias."""
    return state.get(key if key.startswith(("lm_head.", "final_logits_bias")) else "model." + key)


for _model_type, _config in [
    ("bart", "BartConfig"),
    ("mbart", "MBartConfig"),
    ("marian", "MarianConfig"),
    ("pegasus", "PegasusConfig"),
]:
    register(_config)(Family(_model_type, "seq2seq", spec_from_config, Seq2SeqLM, weight))

"""T5-like encoder-decoders: T5 (v1.0), T5 v1.1 / Flan-T5 (gated GELU, untied head) and mT5.

No attention scaling, no projection biases, RMS layer norms before each sublayer, a bucketed
relative position bias (learned in each stack's first layer, shared by its layers), and the
decoder output scaled by d_model**-0.5 where the checkpoint says so (tied embeddings).
"""

import re

from el_export.families import Family, register
from el_export.model.layers import LayerSpec
from el_export.model.models import ModelSpec, Seq2SeqLM


def spec_from_config(config) -> ModelSpec:
    def layer(cross_attention: bool) -> LayerSpec:
        return LayerSpec(
            d_model=config.d_model,
            n_heads=config.num_heads,
            d_head=config.d_kv,
            d_ffn=config.d_ff,
            activation=config.dense_act_fn,
            pre_norm=True,
            norm="rms",
            norm_eps=config.layer_norm_epsilon,
            attention_bias=False,
            ffn_bias=False,
            gated_ffn=config.is_gated_act,
            query_scale=1.0,
            cross_attention=cross_attention,
        )

    scale_outputs = getattr(config, "scale_decoder_outputs", False)  # T5 v1.0 scales; v1.1 and mT5 do not
    return ModelSpec(
        family=config.model_type,
        encoder=layer(cross_attention=False),
        decoder=layer(cross_attention=True),
        encoder_layers=config.num_layers,
        decoder_layers=config.num_decoder_layers,
        vocab_size=config.vocab_size,
        encoder_vocab_size=config.vocab_size,
        max_positions=None,
        relative_buckets=config.relative_attention_num_buckets,
        relative_max_distance=config.relative_attention_max_distance,
        final_layer_norm=True,
        logits_scale=config.d_model**-0.5 if scale_outputs else 1.0,
    )


# Our key (BART-style names) -> HF key, as regular-expression rewrites applied in order.
_RENAMES = [
    (
        r"^(encoder|decoder)\.relative_bias\.relative_attention_bias",
        r"\1.block.0.layer.0.SelfAttention.relative_attention_bias",
    ),
    (r"^(encoder|decoder)\.layer_norm", r"\1.final_layer_norm"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.self_attn\.(q|k|v)_proj", r"\1.block.\2.layer.0.SelfAttention.\3"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.self_attn\.out_proj", r"\1.block.\2.layer.0.SelfAttention.o"),
    (r"^(encoder|decoder)\.layers\.(\d+)\.self_attn_layer_norm", r"\1.block.\2.layer.0.layer_norm"),
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.(q|k|v)_proj", r"decoder.block.\1.layer.1.EncDecAttention.\2"),
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.out_proj", r"decoder.block.\1.layer.1.EncDecAttention.o"),
    (r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm", r"decoder.block.\1.layer.1.layer_norm"),
]
_FFN = {"fc1": "wi", "fc2": "wo"}
_GATED_FFN = {"fc1": "wi_0", "fc_up": "wi_1", "fc2": "wo"}


def weight(state: dict, key: str):
    m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(fc1|fc_up|fc2|final_layer_norm)\.weight$", key)
    if m:  # the feed-forward sublayer is layer.1 of an encoder block, layer.2 of a decoder block
        stack, i, part = m.groups()
        sub = 1 if stack == "encoder" else 2
        if part == "final_layer_norm":
            return state.get(f"{stack}.block.{i}.layer.{sub}.layer_norm.weight")
        gated = f"{stack}.block.{i}.layer.{sub}.DenseReluDense.wi_0.weight" in state
        name = (_GATED_FFN if gated else _FFN)[part]
        return state.get(f"{stack}.block.{i}.layer.{sub}.DenseReluDense.{name}.weight")
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return state.get(key)


for _model_type, _config in [("t5", "T5Config"), ("mt5", "MT5Config")]:
    register(_config)(
        Family(
            _model_type, "seq2seq", spec_from_config, Seq2SeqLM, weight,
            fp32_modules=("*.fc2",),
            fp32_reason="T5's feed-forward output overflows float16 (HF keeps `wo` in float32 too)",
        )
    )  # fmt: skip

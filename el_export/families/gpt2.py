"""GPT-2, decoder-only. Its prompt plays the encoder output's part: under EL each layer's prompt
hidden states are kept once per input and shared by its beams; only generated tokens are per beam.

HF stores GPT-2's projections as Conv1D ([in, out], q/k/v fused in c_attn); they are split and
transposed into the shared blocks' Linear layout here.
"""

import re

from el_export.errors import UnsupportedModelError
from el_export.families import Family, register
from el_export.model.layers import LayerSpec
from el_export.model.models import DecoderOnlyLM, ModelSpec


def spec_from_config(config) -> ModelSpec:
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        raise UnsupportedModelError("GPT-2 attention scaling other than 1/sqrt(head width) is not supported")
    d = config.n_embd
    layer = LayerSpec(
        d_model=d,
        n_heads=config.n_head,
        d_head=d // config.n_head,
        d_ffn=config.n_inner or 4 * d,
        activation=config.activation_function,
        pre_norm=True,
        norm_eps=config.layer_norm_epsilon,
        cross_attention=False,
    )
    return ModelSpec(
        family="gpt2",
        decoder=layer,
        decoder_layers=config.n_layer,
        vocab_size=config.vocab_size,
        max_positions=config.n_positions,
        final_layer_norm=True,
    )


_NAMES = {
    "self_attn_layer_norm": "ln_1",
    "final_layer_norm": "ln_2",
    "self_attn.out_proj": "attn.c_proj",
    "fc1": "mlp.c_fc",
    "fc2": "mlp.c_proj",
}
_STACK = {"embed_tokens.weight": "wte.weight", "embed_positions.weight": "wpe.weight", "layer_norm": "ln_f"}


def weight(state: dict, key: str):
    if key == "lm_head.weight":
        return state.get("lm_head.weight", state.get("transformer.wte.weight"))
    m = re.match(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m is None:
        name = key.removeprefix("decoder.")
        for ours, theirs in _STACK.items():
            if name.startswith(ours):
                return state.get("transformer." + theirs + name[len(ours) :])
        return None
    i, module, kind = m.groups()
    prefix = f"transformer.h.{i}."
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        fused = state.get(prefix + f"attn.c_attn.{kind}")  # Conv1D: weight [d, 3d], bias [3d]
        if fused is None:
            return None
        j = "qkv".index(module[len("self_attn.")])
        d = fused.shape[-1] // 3
        part = fused[..., j * d : (j + 1) * d]
        return part.t() if kind == "weight" else part
    tensor = state.get(prefix + f"{_NAMES[module]}.{kind}")
    is_conv1d = module in ("self_attn.out_proj", "fc1", "fc2")
    return tensor.t() if tensor is not None and is_conv1d and kind == "weight" else tensor


register("GPT2Config")(
    Family("gpt2", "decoder-only", spec_from_config, DecoderOnlyLM, weight, auto_model="AutoModelForCausalLM")
)

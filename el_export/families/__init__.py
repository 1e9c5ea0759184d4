"""Model families: each maps a Hugging Face config and weights onto the shared building blocks.

Families register by HF config class name. An architecture that EL-attention cannot express is
refused with the reason; one that is merely not implemented is refused with the supported list.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from el_export.errors import CheckpointError, UnsupportedModelError
from el_export.model.models import alignment_heads


@dataclass(frozen=True)
class Family:
    """One family: how to describe a config as a spec, and build + fill the module from HF weights."""

    name: str
    kind: str  # "seq2seq" | "decoder-only"
    spec_from_config: Callable  # HF config -> ModelSpec (raises UnsupportedModelError)
    build: Callable  # spec -> nn.Module with the shared blocks
    weight: Callable[[dict, str], "torch.Tensor | None"]  # (HF state dict, our key) -> tensor, None if missing
    # Modules (fnmatch patterns over our module names) that stay fp32 in fp16 graphs, and why.
    fp32_modules: tuple[str, ...] = ()
    fp32_reason: str = ""
    auto_model: str = "AutoModelForSeq2SeqLM"  # the transformers auto class that loads its checkpoints


_BY_CONFIG: dict[str, Family] = {}

# Architectures whose keys are rotated by position (RoPE): q_i W_k^i^T depends on the key's
# position, so no single expanded query exists and EL-attention cannot be applied.
_ROTARY_MODEL_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3",
    "phi",
    "phi3",
    "gpt_neox",
    "gptj",
    "falcon",
    "olmo",
    "olmo2",
    "stablelm",
    "starcoder2",
    "cohere",
    "deepseek_v3",
    "granite",
    "smollm3",
    "internlm2",
    "codegen",
    "persimmon",
    "chatglm",
)


def register(*config_class_names: str):
    def add(family: Family) -> Family:
        for name in config_class_names:
            _BY_CONFIG[name] = family
        return family

    return add


def family_for(config) -> Family:
    """The family that handles this HF config, or UnsupportedModelError saying why not.

    Raises:
        UnsupportedModelError: no family handles it (with the reason).
        CheckpointError: a size in the config is not a positive integer, or the pad id is outside the vocabulary.
    """
    _load_builtin_families()
    name = type(config).__name__
    if name in _BY_CONFIG:
        _check_sizes(config)
        return _BY_CONFIG[name]
    model_type = getattr(config, "model_type", "?")
    rope = getattr(config, "rope_theta", None) is not None or getattr(config, "rope_scaling", None) is not None
    if model_type in _ROTARY_MODEL_TYPES or rope or getattr(config, "rotary_dim", None):
        raise UnsupportedModelError(
            f"{model_type} ({name}) uses rotary position embeddings: each key is rotated by its position, "
            "so no single expanded query q W_k^T exists and EL-attention cannot be applied"
        )
    supported = ", ".join(sorted({f.name for f in _BY_CONFIG.values()}))
    raise UnsupportedModelError(f"{model_type} ({name}) is not supported by el-export; supported families: {supported}")


# Config fields (of every family's HF config) that size a module: a zero, a string or a list there would crash the
# module's construction inside transformers or torch with a traceback.
_SIZE_FIELDS = (
    "d_model", "d_kv", "d_ff", "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "vocab_size",
    "decoder_vocab_size", "encoder_layers", "decoder_layers", "num_layers", "num_decoder_layers",
    "encoder_attention_heads", "decoder_attention_heads", "num_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "max_position_embeddings", "relative_attention_num_buckets", "relative_attention_max_distance", "num_mel_bins",
    "max_source_positions", "max_target_positions",
)  # fmt: skip


def _check_sizes(config) -> None:
    bad = [f"{k} {v!r}" for k in _SIZE_FIELDS if (v := getattr(config, k, None)) is not None
           and (type(v) is not int or v < 1)]  # fmt: skip
    if bad:
        raise CheckpointError(f"config.json sets {', '.join(bad)}: sizes must be positive integers; fix config.json")
    pad, vocab = getattr(config, "pad_token_id", None), config.vocab_size
    if type(pad) is int and not 0 <= pad < vocab:
        raise CheckpointError(f"config.json sets pad_token_id {pad}, outside the vocabulary ({vocab}); fix config.json")


def family_named(name: str) -> Family:
    """The registered family a manifest names (its `family` field).

    Raises:
        UnsupportedModelError: no family has that name.
    """
    _load_builtin_families()
    by_name = {f.name: f for f in _BY_CONFIG.values()}
    if name not in by_name:
        raise UnsupportedModelError(f"no family is named {name!r}; families: {', '.join(sorted(by_name))}")
    return by_name[name]


def supported_config_names() -> list[str]:
    _load_builtin_families()
    return sorted(_BY_CONFIG)


def _load_builtin_families() -> None:
    """Import the built-in family modules (explicitly, not as a side effect of import order)."""
    from el_export.families import bart, gpt2, t5, whisper  # noqa: F401


def build_from_hf(hf_model: nn.Module) -> tuple[nn.Module, Family]:
    """Build our module for an HF model and copy its weights, checking every name and shape.

    Raises:
        UnsupportedModelError: the family is unknown or a feature of this config is not supported.
        CheckpointError: weights are missing or have unexpected shapes (all listed at once).
    """
    family = family_for(hf_model.config)
    spec = family.spec_from_config(hf_model.config)
    heads = getattr(getattr(hf_model, "generation_config", None), "alignment_heads", None)
    if heads is not None:  # Whisper's word timestamps read these heads' cross-attention
        spec = replace(spec, alignment_heads=alignment_heads(heads))
    with torch.device(next(hf_model.parameters()).device):  # initialise where the weights already are
        model = family.build(spec)
    source = hf_model.state_dict()
    weights, problems = {}, []
    for key, tensor in model.state_dict().items():
        weights[key] = family.weight(source, key)
        if weights[key] is None:
            problems.append(f"missing the weight for {key}")
        elif weights[key].shape != tensor.shape:
            problems.append(
                f"{key} has shape {tuple(weights[key].shape)} in the checkpoint, expected {tuple(tensor.shape)}"
            )
    if problems:
        raise CheckpointError(f"{family.name} checkpoint does not match its config: " + "; ".join(problems))
    model.load_state_dict(weights, strict=True)
    return model.eval(), family


def cast(model: nn.Module, family: Family, dtype: str) -> list[str]:
    """Cast a built model to `dtype`, keeping the family's overflow-prone modules in fp32.

    Returns:
        The names of the modules kept in fp32 (empty for float32).
    """
    import fnmatch

    model.to(getattr(torch, dtype))
    if dtype == "float32":
        return []
    kept = [name for name, _ in model.named_modules() if any(fnmatch.fnmatch(name, p) for p in family.fp32_modules)]
    for name in kept:
        model.get_submodule(name).float()
    return kept

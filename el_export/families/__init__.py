"""Model families: each maps a Hugging Face config and weights onto the shared building blocks.

Families register by HF config class name. An architecture that EL-attention cannot express is
refused with the reason; one that is merely not implemented is refused with the supported list.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from el_export.errors import CheckpointError, UnsupportedModelError


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
    """The family that handles this HF config, or UnsupportedModelError saying why not."""
    _load_builtin_families()
    name = type(config).__name__
    if name in _BY_CONFIG:
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

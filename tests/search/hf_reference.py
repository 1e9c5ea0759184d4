"""HF's own option resolution and logits processors, run through the private steps `generate` runs."""

import torch
from transformers import GenerationConfig


def hf_generation_config(model, model_defaults: dict, prompt_length: int, **kwargs) -> GenerationConfig:
    """The generation config HF `generate` ends up with, before building its logits processors.

    Raises whatever HF raises (ValueError, TypeError) for invalid arguments.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig(**model_defaults)
    try:
        has_default_max = kwargs.get("max_length") is None and model.generation_config.max_length is None
        has_default_min = kwargs.get("min_length") is None and model.generation_config.min_length is None
        config, _ = model._prepare_generation_config(None, **kwargs)
        model._prepare_special_tokens(config, True, device="cpu")
        prompt = torch.zeros((1, prompt_length), dtype=torch.long)
        config = model._prepare_generated_length(
            config, has_default_max, has_default_min, "input_ids", prompt_length, prompt
        )
        model._validate_generated_length(config, prompt_length, has_default_max)
        return config
    finally:
        model.generation_config = saved


def hf_processors(model, config: GenerationConfig, prompt: torch.Tensor, mask: torch.Tensor | None):
    """HF's `LogitsProcessorList` for a decoder-only prompt [N, P] with its mask (rows already expanded)."""
    return model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt.shape[1],
        encoder_input_ids=prompt,
        device="cpu",
        model_kwargs={"attention_mask": mask},
    )

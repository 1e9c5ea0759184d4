"""A `StepDecoder` that runs a HF model the way HF `generate` runs it, so parity tests compare search only.

It prepares the same model kwargs as `generate` (encoder outputs, masks, position ids, cache,
`logits_to_keep`) and goes through the model's own `prepare_inputs_for_generation` and
`_update_model_kwargs_for_generation`, so its logits are bit-identical to the ones HF's loop sees.
"""

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


class HFStepDecoder:
    """Step interface over a HF model for B inputs.

    Args:
        model: a HF generation model in eval mode.
        input_ids: int64 [B, S], the encoder input (encoder-decoder) or the prompt (decoder-only).
        attention_mask: int64 [B, S], 0 on padding.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        self.is_encoder_decoder = model.config.is_encoder_decoder
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.kwargs: dict = {}

    @torch.no_grad()
    def start(self, prompt_ids: torch.Tensor, rows_per_input: int) -> torch.Tensor:
        model, k = self.model, rows_per_input
        config = model.config.get_text_config(decoder=True)
        kwargs: dict = {"use_cache": True, "past_key_values": DynamicCache(config=config)}
        mask = self.attention_mask
        if self.is_encoder_decoder:
            encoder_outputs = model.get_encoder()(input_ids=self.input_ids, attention_mask=mask, return_dict=True)
            encoder_outputs["last_hidden_state"] = encoder_outputs.last_hidden_state.repeat_interleave(k, dim=0)
            kwargs["encoder_outputs"] = encoder_outputs
            kwargs["attention_mask"] = mask.repeat_interleave(k, dim=0)
            kwargs["past_key_values"] = EncoderDecoderCache(kwargs["past_key_values"], DynamicCache(config=config))
        else:
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            kwargs["position_ids"] = position_ids.repeat_interleave(k, dim=0)
            # generate drops an all-ones mask, which changes the attention kernel's path
            kwargs["attention_mask"] = None if bool((mask == 1).all()) else mask.repeat_interleave(k, dim=0)
        if model._supports_logits_to_keep():
            kwargs["logits_to_keep"] = 1
        self.kwargs = kwargs
        inputs = model.prepare_inputs_for_generation(
            prompt_ids.repeat_interleave(k, dim=0), is_first_iteration=True, **kwargs
        )
        return self._forward(inputs)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        inputs = self.model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **self.kwargs)
        return self._forward(inputs)

    def reorder(self, row_indices: torch.Tensor, input_indices: torch.Tensor | None = None) -> None:
        """HF holds everything per row: dropping inputs (input_indices given) drops their rows of every kwarg."""
        self.kwargs["past_key_values"].reorder_cache(row_indices)
        if input_indices is None:  # a beam reorder: HF reorders the cache only (the rows of an input share the rest)
            return
        encoder_outputs = self.kwargs.get("encoder_outputs")
        if encoder_outputs is not None:
            encoder_outputs["last_hidden_state"] = encoder_outputs.last_hidden_state.index_select(0, row_indices)
        for name in ("attention_mask", "position_ids"):
            if self.kwargs.get(name) is not None:
                self.kwargs[name] = self.kwargs[name].index_select(0, row_indices)

    def _forward(self, inputs: dict) -> torch.Tensor:
        outputs = self.model(**inputs, return_dict=True)
        self.kwargs = self.model._update_model_kwargs_for_generation(
            outputs, self.kwargs, is_encoder_decoder=self.is_encoder_decoder
        )
        return outputs.logits[:, -1].to(dtype=torch.float32, copy=True)

"""What search needs from a model: the step interface every runtime backend implements.

Search is written once against this protocol and knows no backend, no graph and no family.
Rows are laid out input-major: row `b * k + j` is the j-th hypothesis (beam, or return
sequence) of input `b`, exactly as HF `generate` lays out `input_ids` after expansion.
"""

from typing import Protocol

import torch


class StepDecoder(Protocol):
    """A decoder whose encoder (if any) has already run for a batch of B inputs."""

    def start(self, prompt_ids: torch.Tensor, rows_per_input: int) -> torch.Tensor:
        """Feed the decoder prompt and return the logits for the first new token.

        Args:
            prompt_ids: int64 [B, P], the decoder prompt of each input (for encoder-decoder models
                `decoder_start_token_id` and any forced prompt; for decoder-only models the prompt).
            rows_per_input: k, the number of hypotheses each input will carry (num_beams, or
                num_return_sequences when sampling without beams).

        Returns:
            float32 logits [B * k, V] on the decoder's device; rows of one input are identical.
        """
        ...

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append one token to every row. int64 [N, 1] -> float32 logits [N, V]."""
        ...

    def reorder(self, row_indices: torch.Tensor) -> None:
        """Make row i of every per-row cache a copy of row `row_indices[i]` (int64 [N], global rows)."""
        ...

"""What search needs from a model: the step interface every runtime backend implements.

Search is written once against this protocol and knows no backend, no graph and no family.
Rows are laid out input-major: row `b * k + j` is the j-th hypothesis (beam, or return
sequence) of input `b`, exactly as HF `generate` lays out `input_ids` after expansion.
"""

from typing import Protocol

import torch


class StepDecoder(Protocol):
    """A decoder whose encoder (if any) has already run for a batch of B inputs."""

    def start(
        self, prompt_ids: torch.Tensor, rows_per_input: int, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Feed the decoder prompt and return the logits for the first new token.

        Args:
            prompt_ids: int64 [B, P], the decoder prompt of each input (for encoder-decoder models
                `decoder_start_token_id` and any forced prompt; for decoder-only models the prompt).
            rows_per_input: k, the number of hypotheses each input will carry (num_beams, or
                num_return_sequences when sampling without beams).
            prompt_mask: int64 [B, P], 0 on the left padding of encoder-decoder prompts of different lengths
                (Whisper's previous-text prompts): padding is never attended and takes no position, as HF's
                `decoder_attention_mask`. None: every prompt token is real.

        Returns:
            float32 logits [B * k, V] on the decoder's device; rows of one input are identical.
        """
        ...

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append one token to every row. int64 [N, 1] -> float32 logits [N, V]."""
        ...

    def reorder(self, row_indices: torch.Tensor, input_indices: torch.Tensor | None = None) -> None:
        """Make row i of every per-row tensor a copy of row `row_indices[i]`, dropping rows not named.

        Args:
            row_indices: int64 [N'], global rows; N' < N where the rows of finished inputs are dropped.
            input_indices: int64 [B'], the inputs kept, in order: every per-input tensor (an EL encoder output,
                a decoder-only prompt) keeps those. None keeps every input (a beam reorder, N' = N). The kept
                rows of each kept input are contiguous, input-major, k per input.
        """
        ...


class RunningDecoder(StepDecoder, Protocol):
    """A step decoder whose inputs can join (`merge`) and leave (`reorder` with input_indices) at step boundaries:
    the running batch of in-flight batching. Its rows sit at different steps; each row's result equals a
    decoder holding that input alone."""

    @property
    def rows(self) -> int:
        """N, the rows the next `step` takes."""
        ...

    @property
    def inputs(self) -> int:
        """B, the inputs those rows belong to (N = B * k)."""
        ...

    def merge(self, other: "RunningDecoder") -> None:
        """Append the inputs and rows of `other` (started, same backend, same rows per input) after this one's;
        the next `step` runs all of them in one call. `other` is not to be stepped afterwards."""
        ...

"""Tiny seeded HF models for the search parity tests.

Weights use a large init std so the logits of competing tokens are far apart (no near-ties that would
make parity depend on rounding). Bart's eos logit is raised so hypotheses end at different lengths.
"""

from dataclasses import dataclass

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

BART_EOS_BIAS = 5.0


@dataclass
class TinyModel:
    """A model with a padded batch: `inputs` go to the encoder (Bart) or are the prompt (GPT-2)."""

    model: torch.nn.Module
    inputs: torch.Tensor  # int64 [B, S]
    mask: torch.Tensor  # int64 [B, S], 0 on padding

    @property
    def defaults(self) -> dict:
        return self.model.generation_config.to_diff_dict()


def _padded(batch: int, length: int, low: int, high: int, pad: int, pad_lengths: list[int], left: bool):
    inputs = torch.randint(low, high, (batch, length))
    mask = torch.ones_like(inputs)
    for row, n in enumerate(pad_lengths):
        if n:
            span = slice(0, n) if left else slice(length - n, length)
            inputs[row, span], mask[row, span] = pad, 0
    return inputs, mask


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bart() -> TinyModel:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=24, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        init_std=0.5,
    )  # fmt: skip
    model = BartForConditionalGeneration(config).eval()
    model.final_logits_bias[0, config.eos_token_id] = BART_EOS_BIAS
    inputs, mask = _padded(3, 7, 3, 24, config.pad_token_id, [0, 2, 4], left=False)
    return TinyModel(model, inputs, mask)


@pytest.fixture(scope="session")
def gpt2() -> TinyModel:
    """pad id 0 (falsy: HF's beam search then fills with eos), eos 1, left-padded prompts."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=16, n_embd=16, n_layer=1, n_head=2, n_positions=32, initializer_range=0.5,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    inputs, mask = _padded(3, 5, 2, 16, config.pad_token_id, [2, 0, 1], left=True)
    return TinyModel(model, inputs, mask)

"""Relative position biases: additive per-head score biases (T5), which EL-attention keeps exact.

A bias added to q_i . k_j depends on the key's position, not on its content, so it adds to the
expanded-query scores q'_i . h_j unchanged; unlike rotary embeddings, it needs no rotated keys.
"""

import math

import torch
from torch import nn


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias: one learned scalar per head and distance bucket."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, query_positions: torch.Tensor, key_length) -> torch.Tensor:
        """int64 [T] query positions, R keys at positions 0..R-1 -> bias [h, T, R]."""
        keys = torch.arange(key_length, device=query_positions.device)
        buckets = self._bucket(keys[None, :] - query_positions[:, None])  # [T, R]
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # [h, T, R]

    def _bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """HF `T5Attention._relative_position_bucket`, operation for operation."""
        num_buckets, buckets = self.num_buckets, torch.zeros_like(relative)
        if self.bidirectional:
            num_buckets //= 2
            buckets = buckets + (relative > 0).to(torch.long) * num_buckets
            relative = torch.abs(relative)
        else:
            relative = -torch.min(relative, torch.zeros_like(relative))
        max_exact = num_buckets // 2
        is_small = relative < max_exact
        large = max_exact + (
            torch.log(relative.float() / max_exact)
            / math.log(self.max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        large = torch.min(large, torch.full_like(large, num_buckets - 1))
        return buckets + torch.where(is_small, relative, large)

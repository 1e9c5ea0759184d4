"""Multi-head attention, evaluated the standard way (K/V) or the EL way, for every family.

EL-attention (Chen et al., ICML 2021) regroups the products of one head i:

    softmax(q_i K_i^T) V_i  ==  (softmax((q_i W_k^i^T) H^T) H) W_v^i^T + b_v^i

so attention reads the memory H [S, d] itself instead of per-head keys and values. The key
bias adds q_i . b_k^i to every score of a row, which softmax drops; the value bias passes
through because each row of p sums to 1. Nothing is approximated: the same function, in
another order. See DESIGN.md section 1.

This module knows no family: layers hand it projections, memories and additive biases.
"""

import torch
from torch import nn


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int/bool mask (1 = attend) -> additive bias (0 or the dtype's most negative value)."""
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


class MultiHeadAttention(nn.Module):
    """The weights of one attention block, named as BART-like checkpoints name them.

    `d_inner` = heads x head width; it equals `d_model` everywhere except some T5 configs.
    `scale` multiplies the query (1/sqrt(d_head) for most families, 1 for T5).
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, bias: bool, scale: float):
        super().__init__()
        self.n_heads, self.d_head, self.scale = n_heads, d_head, scale
        d_inner = n_heads * d_head
        self.q_proj = nn.Linear(d_model, d_inner, bias=bias)
        self.k_proj = nn.Linear(d_model, d_inner, bias=bias)
        self.v_proj = nn.Linear(d_model, d_inner, bias=bias)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    # ---- standard path: per-head keys and values ---------------------------------------------

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, h*dh] -> [N, h, T, dh]"""
        N, T, _ = x.shape
        return x.view(N, T, self.n_heads, self.d_head).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, S, d] -> K, V each [N, h, S, dh]: what the standard path caches."""
        return self.split_heads(self.k_proj(memory)), self.split_heads(self.v_proj(memory))

    def attend_kv(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        """Queries x [N, T, d] against K, V [N, h, S, dh]; bias broadcasts to [N, h, T, S]."""
        return self.kv_output(self.probabilities(x, k, bias), v)

    def probabilities(self, x: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Attention probabilities [N, h, T, S] of queries x [N, T, d] over keys K [N, h, S, dh]."""
        q = self.split_heads(self.q_proj(x)) * self.scale  # [N, h, T, dh]
        scores = q @ k.transpose(-1, -2)  # [N, h, T, S]
        if bias is not None:
            scores = scores + bias
        return torch.softmax(scores, dim=-1)

    def kv_output(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Probabilities [N, h, T, S] applied to V [N, h, S, dh] -> [N, T, d]."""
        N, _, T, _ = p.shape
        out = p @ v  # [N, h, T, dh]
        return self.out_proj(out.transpose(1, 2).reshape(N, T, -1))

    # ---- EL path: expanded queries against the memory itself ---------------------------------

    def expand_query(self, x: torch.Tensor) -> torch.Tensor:
        """q'_i = q_i W_k^i^T. [N, T, d] -> [N, T*h, d]; the key bias is dropped (softmax-invariant)."""
        N, T, d = x.shape
        q = self.q_proj(x).view(N * T, self.n_heads, self.d_head) * self.scale  # [NT, h, dh]
        w_k = self.k_proj.weight.view(self.n_heads, self.d_head, d)  # [h, dh, d]
        q_exp = q.transpose(0, 1) @ w_k  # [h, NT, d]: one GEMM per head over all rows
        return q_exp.transpose(0, 1).reshape(N, T * self.n_heads, d)

    def el_output(self, context: torch.Tensor, T: int) -> torch.Tensor:
        """Apply W_v per head after the weighted sum. context [N, T*h, d] -> [N, T, d]."""
        N, _, d = context.shape
        ctx = context.view(N * T, self.n_heads, d).transpose(0, 1)  # [h, NT, d]
        w_v = self.v_proj.weight.view(self.n_heads, self.d_head, d)  # [h, dh, d]
        out = (ctx @ w_v.transpose(1, 2)).transpose(0, 1)  # [NT, h, dh]
        if self.v_proj.bias is not None:
            out = out + self.v_proj.bias.view(self.n_heads, self.d_head)
        return self.out_proj(out.reshape(N, T, -1))


def el_attend(
    q_exp: torch.Tensor,
    shared: torch.Tensor | None = None,
    shared_bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rows_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """EL attention of expanded queries over a shared memory, a per-row memory, or both.

    The shared memory (an encoder output, or a decoder-only prompt's hidden states) is held once
    per input and read by all k rows (beams) of that input in one GEMM: the rows' queries are
    folded into the matrix, [B, k*T*h, d] @ [B, d, S]. The per-row memory (a decoder's own
    earlier inputs) belongs to each row. When both are given, one softmax spans both.

    Args:
        q_exp: [N, Q, d] expanded queries (Q = T*h), N = B*k rows, input-major.
        shared: [B, S, d]; shared_bias: additive, broadcastable to [B, k*Q, S].
        rows: [N, R, d]; rows_bias: additive, broadcastable to [N, Q, R].

    Returns:
        context [N, Q, d]: probability-weighted sums of memory rows, before W_v.
    """
    return el_context(el_probabilities(q_exp, shared, shared_bias, rows, rows_bias), shared, rows)


def el_probabilities(q_exp, shared=None, shared_bias=None, rows=None, rows_bias=None) -> torch.Tensor:
    """`el_attend`'s attention probabilities [N, Q, S + R]: the shared memory's columns first, then the rows'."""
    N, Q, d = q_exp.shape
    scores = []
    if shared is not None:
        B = shared.shape[0]
        s = q_exp.reshape(B, -1, d) @ shared.transpose(1, 2)  # [B, k*Q, S]
        if shared_bias is not None:
            s = s + shared_bias
        scores.append(s.reshape(N, Q, -1))  # [N, Q, S]
    if rows is not None:
        r = q_exp @ rows.transpose(1, 2)  # [N, Q, R]
        if rows_bias is not None:
            r = r + rows_bias
        scores.append(r)
    return torch.softmax(torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0], dim=-1)


def el_context(p: torch.Tensor, shared: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`el_attend`'s weighted sums [N, Q, d] of the memories under probabilities p [N, Q, S + R]."""
    N, Q, _ = p.shape
    context = None
    if shared is not None:
        B, S, d = shared.shape
        p_shared = p[..., :S].reshape(B, -1, S)  # [B, k*Q, S]
        context = (p_shared @ shared).reshape(N, Q, d)
    if rows is not None:
        p_rows = p[..., p.shape[-1] - rows.shape[1] :]  # [N, Q, R]
        ctx_rows = p_rows @ rows
        context = ctx_rows if context is None else context + ctx_rows
    return context

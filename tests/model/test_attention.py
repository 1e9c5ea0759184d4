"""EL attention equals standard attention: same function, other order (DESIGN.md section 1)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from el_export.model.attention import MultiHeadAttention, additive_mask, el_attend
from el_export.model.layers import DecoderLayer, LayerSpec, el_bias
from el_export.tolerance import BLOCK_TOLERANCE


def _attention(d, h, bias, seed):
    torch.manual_seed(seed)
    attn = MultiHeadAttention(d, h, d // h, bias=bias, scale=(d // h) ** -0.5)
    if bias:  # make the biases matter: they are what EL handles specially
        with torch.no_grad():
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                lin.bias.normal_(0, 1)
    return attn.eval()


def _padding_mask(B, S, g):
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    return (torch.arange(S)[None, :] < lengths[:, None]).to(torch.int64)


shapes = st.fixed_dictionaries(
    {
        "B": st.integers(1, 3),
        "k": st.integers(1, 4),
        "T": st.integers(1, 3),
        "S": st.integers(1, 9),
        "heads": st.sampled_from([1, 2, 4]),
        "d_per_head": st.sampled_from([2, 4, 8]),
        "bias": st.booleans(),
        "seed": st.integers(0, 10_000),
    }
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_el_cross_attention_equals_standard(p):
    """Expanded queries of all beams against one shared H == per-beam K/V from H repeated per beam."""
    B, k, T, S, h = p["B"], p["k"], p["T"], p["S"], p["heads"]
    d = h * p["d_per_head"]
    attn = _attention(d, h, p["bias"], p["seed"])
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(B * k, T, d, generator=g)
    memory = torch.randn(B, S, d, generator=g)
    mask = _padding_mask(B, S, g)
    with torch.no_grad():
        k_, v_ = attn.keys_values(memory.repeat_interleave(k, 0))
        bias = additive_mask(mask.repeat_interleave(k, 0), x.dtype)[:, None, None, :]
        standard = attn.attend_kv(x, k_, v_, bias)
        ctx = el_attend(attn.expand_query(x), shared=memory, shared_bias=additive_mask(mask, x.dtype)[:, None, :])
        el = attn.el_output(ctx, T)
    assert (el - standard).abs().max() <= BLOCK_TOLERANCE


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_el_attention_over_shared_and_row_memory_equals_standard(p):
    """One softmax over a shared prompt (once per input) + per-row history == standard over their concat."""
    B, k, T, S, h = p["B"], p["k"], p["T"], p["S"], p["heads"]
    d = h * p["d_per_head"]
    attn = _attention(d, h, p["bias"], p["seed"])
    g = torch.Generator().manual_seed(p["seed"] + 1)
    N, R = B * k, T + 2
    x = torch.randn(N, T, d, generator=g)
    shared = torch.randn(B, S, d, generator=g)
    rows = torch.randn(N, R, d, generator=g)
    mask = _padding_mask(B, S, g)
    with torch.no_grad():
        memory = torch.cat([shared.repeat_interleave(k, 0), rows], dim=1)
        full_mask = torch.cat([mask.repeat_interleave(k, 0), torch.ones(N, R, dtype=torch.int64)], dim=1)
        k_, v_ = attn.keys_values(memory)
        standard = attn.attend_kv(x, k_, v_, additive_mask(full_mask, x.dtype)[:, None, None, :])
        ctx = el_attend(
            attn.expand_query(x),
            shared=shared,
            shared_bias=additive_mask(mask, x.dtype)[:, None, :],
            rows=rows,
        )
        el = attn.el_output(ctx, T)
    assert (el - standard).abs().max() <= BLOCK_TOLERANCE


@settings(max_examples=25, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "B": st.integers(1, 3),
            "k": st.integers(1, 4),
            "S": st.integers(1, 9),
            "steps": st.integers(1, 5),
            "pre_norm": st.booleans(),
            "seed": st.integers(0, 10_000),
        }
    )
)
def test_decoder_layer_el_steps_equal_kv_steps(p):
    """A decoder layer stepped token by token: EL cache (layer inputs) == K/V cache, pre- and post-norm."""
    torch.manual_seed(p["seed"])
    spec = LayerSpec(d_model=16, n_heads=4, d_head=4, d_ffn=32, activation="gelu", pre_norm=p["pre_norm"])
    layer = DecoderLayer(spec).eval()
    B, k, S = p["B"], p["k"], p["S"]
    N = B * k
    g = torch.Generator().manual_seed(p["seed"])
    memory = torch.randn(B, S, 16, generator=g)
    mask = _padding_mask(B, S, g)
    cache = {"el": torch.zeros(N, 0, 16), "k": torch.zeros(N, 4, 0, 4), "v": torch.zeros(N, 4, 0, 4)}

    def extend_el(a):
        cache["el"] = torch.cat([cache["el"], a], dim=1)
        return cache["el"]

    def extend_kv(_a, k_new, v_new):
        cache["k"], cache["v"] = torch.cat([cache["k"], k_new], dim=2), torch.cat([cache["v"], v_new], dim=2)
        return cache["k"], cache["v"]

    with torch.no_grad():
        cross_k, cross_v = layer.encoder_attn.keys_values(memory.repeat_interleave(k, 0))
        for _ in range(p["steps"]):
            x = torch.randn(N, 1, 16, generator=g)
            el = layer.forward_el(x, extend_el, None, memory, additive_mask(mask, x.dtype)[:, None, :])
            kv = layer.forward_kv(
                x,
                extend_kv,
                None,
                cross_k,
                cross_v,
                additive_mask(mask.repeat_interleave(k, 0), x.dtype)[:, None, None, :],
            )
            assert (el - kv).abs().max() <= BLOCK_TOLERANCE
    assert cache["el"].shape == (N, p["steps"], 16)  # EL caches d per token and layer; K/V caches 2 d


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_el_self_attention_with_per_row_bias_equals_standard(p):
    """Rows of a running batch carry their own cache masks (left padding) plus a per-head bias shared by all rows
    (T5's relative bias): `el_bias` lays out [N, h or 1, T, R] for the expanded queries as the standard path reads
    it."""
    B, k, T, h = p["B"], p["k"], p["T"], p["heads"]
    d = h * p["d_per_head"]
    attn = _attention(d, h, p["bias"], p["seed"])
    g = torch.Generator().manual_seed(p["seed"] + 2)
    N, R = B * k, p["S"] + T
    x = torch.randn(N, T, d, generator=g)
    rows = torch.randn(N, R, d, generator=g)
    padding = torch.randint(0, R - T + 1, (N,), generator=g)  # each row's padding, before its real entries
    mask = (torch.arange(R)[None, :] >= padding[:, None]).to(torch.int64)  # [N, R]; the T new entries are real
    per_head = torch.randn(h, T, R, generator=g)
    bias = additive_mask(mask, x.dtype)[:, None, None, :] + per_head  # [N, h, T, R]
    with torch.no_grad():
        k_, v_ = attn.keys_values(rows)
        standard = attn.attend_kv(x, k_, v_, bias)
        el = attn.el_output(el_attend(attn.expand_query(x), rows=rows, rows_bias=el_bias(bias, h)), T)
        one_bias = additive_mask(mask, x.dtype)[:, None, None, :].expand(N, 1, T, R)  # shared by the heads
        standard_one = attn.attend_kv(x, k_, v_, one_bias)
        el_one = attn.el_output(el_attend(attn.expand_query(x), rows=rows, rows_bias=el_bias(one_bias, h)), T)
    assert (el - standard).abs().max() <= BLOCK_TOLERANCE
    assert (el_one - standard_one).abs().max() <= BLOCK_TOLERANCE

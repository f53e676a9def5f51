"""Sliding-window causal attention (Longformer, Beltagy et al. 2020, arXiv 2004.05150; Mistral 7B, arXiv 2310.06825),
the local half of Gated DeltaNet's H1 hybrid (arXiv 2412.06464), Hymba and Titans.

The T queries are the last T of S key positions (a cached prefix of S - T keys may precede them), so query t sits
at absolute position i = S - T + t. With window W, query i reads key j iff

    i - W < j <= i   and   key_padding_mask[b, j]        o_i = sum_j softmax_j(scaling * q_i . k_j) v_j

which is transformers' ``sliding_window_causal_mask_function`` (``kv_idx > q_idx - W`` and ``kv_idx <= q_idx``)
and ``padding_mask_function``. A row with no allowed key (a pad query whose window holds only pads) returns zeros.

Shapes: query [B, H, T, d]; key, value [B, H_kv, S, d] with S >= T and H % H_kv == 0 (grouped-query attention:
query head h reads KV head h // (H / H_kv), as transformers' ``repeat_kv``); key_padding_mask [B, S], True / 1 =
real token. Returns [B, T, H, d] (the layout of transformers' attention functions) in query's dtype; the softmax
is fp32.

Two implementations:
  * ``sliding_window_attention_reference``: the dense [B, 1, T, S] mask and eager softmax, O(T * S) memory; the
    definition;
  * ``sliding_window_attention``: blockwise. A block of queries [t0, t1) can only see keys in
    [i(t0) - W + 1, i(t1 - 1)], so it builds that [block, block + W - 1] mask only, and memory is O(T * W)
    (O(block * (block + W)) at a time without autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(query: torch.Tensor, key: torch.Tensor, window: int, key_padding_mask: torch.Tensor | None) -> None:
    batch, heads, length, _ = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    if window < 1:
        raise ValueError(f"window must be >= 1 (a query always sees itself), got {window}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if kv_length < length:
        raise ValueError(f"key length S ({kv_length}) must be >= query length T ({length}): queries are the last keys")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, kv_length):
        raise ValueError(
            f"key_padding_mask must be [B, S] = [{batch}, {kv_length}], got {tuple(key_padding_mask.shape)}; "
            "with a 2-D attention_mask longer than the keys (a sliding-window cache), pass attention_mask[:, -S:]"
        )


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, key_padding_mask: torch.Tensor | None):
    """Boolean [B or 1, 1, len(q_pos), len(k_pos)]: i - W < j <= i, and j a real token."""
    band = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
    band = band[None, None]
    if key_padding_mask is None:
        return band
    return band & key_padding_mask[:, k_pos].bool()[:, None, None, :]


def _with_sinks(key, value, allowed, sinks):
    """Keys and values with the sink keys [B or 1, H_kv, P, d] in front, visible to every query."""
    if sinks is None:
        return key, value, allowed
    sink_key, sink_value = (x.expand(key.shape[0], -1, -1, -1).to(key.dtype) for x in sinks)
    visible = allowed.new_ones(*allowed.shape[:-1], sink_key.shape[2])
    return (torch.cat([sink_key, key], dim=2), torch.cat([sink_value, value], dim=2),
            torch.cat([visible, allowed], dim=-1))


def _softmax_attention(q, k, v, allowed, scaling, dropout=0.0, training=False):
    """Eager softmax(scaling q k^T) v in fp32; q [B, h, L, d], k, v [B, h, K, d], allowed broadcastable to [B, h, L, K].

    Rows without an allowed key are opened to every key (finite softmax, finite gradients) and zeroed afterwards.
    """
    has_key = allowed.any(-1, keepdim=True)
    allowed = allowed | ~has_key
    scores = (q @ k.transpose(-1, -2)).float() * scaling
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    weights = F.dropout(weights, p=dropout, training=training).to(v.dtype)
    return (weights @ v) * has_key


def sliding_window_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    scaling: float,
    key_padding_mask: torch.Tensor | None = None,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The definition: the full [B, 1, T, S] mask, KV heads repeated for the query heads. Returns [B, T, H, d]."""
    _check(query, key, window, key_padding_mask)
    length, kv_length = query.shape[2], key.shape[2]
    k_pos = torch.arange(kv_length, device=query.device)
    allowed = _allowed(k_pos[kv_length - length :], k_pos, window, key_padding_mask)
    key, value, allowed = _with_sinks(key, value, allowed, sinks)
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    out = _softmax_attention(query, key, value, allowed, scaling)
    return out.transpose(1, 2).to(query.dtype)


def _block_attention(q, k, v, allowed, scaling, dropout, training):
    """One block; q [B, H_kv, G, L, d], k, v [B, H_kv, K, d], allowed [B or 1, 1, L, K]. Returns [B, L, H, d]."""
    batch, kv_heads, groups, length, head_dim = q.shape
    q = q.reshape(batch, kv_heads, groups * length, head_dim)  # queries grouped under their KV head: no KV copy
    allowed = allowed[:, :, None].expand(-1, -1, groups, -1, -1).reshape(allowed.shape[0], 1, groups * length, -1)
    if dropout > 0.0 and training:
        out = _softmax_attention(q, k, v, allowed, scaling, dropout, training)
    else:
        out = _sdpa_block(q, k, v, allowed, scaling)
    return out.reshape(batch, kv_heads * groups, length, head_dim).transpose(1, 2)


def _sdpa_block(q, k, v, allowed, scaling):
    """torch's fused SDPA on one block; empty rows opened to every key and zeroed, as in ``_softmax_attention``."""
    has_key = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scaling)
    return out * has_key


def sliding_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int,
    scaling: float,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    dropout: float = 0.0,
    training: bool = False,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Blockwise sliding-window attention, equal to ``sliding_window_attention_reference``. Returns [B, T, H, d].

    ``sinks``: keys and values [B or 1, H_kv, P, d] every query sees besides its window (Titans' persistent
    memory), put in front of each block's keys.

    ``block_size`` queries at a time (default: the window clamped to [128, 256], the fastest on CPU at windows 64 and
    2048: short windows do not loop over a handful of tokens, long ones keep small blocks; never more than T).
    ``dropout`` drops attention weights when ``training`` (the eager path); otherwise each block goes through
    ``F.scaled_dot_product_attention``.
    """
    _check(query, key, window, key_padding_mask)
    batch, heads, length, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    if length == 0:
        return query.new_zeros(batch, 0, heads, head_dim)
    block = block_size if block_size is not None else min(max(window, 128), 256)
    block = max(1, min(block, length))
    offset = kv_length - length  # absolute position of query 0
    grouped = query.view(batch, kv_heads, heads // kv_heads, length, head_dim)
    outputs = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        first_key = max(0, offset + start - window + 1)  # the oldest key the block's first query still sees
        q_pos = torch.arange(offset + start, offset + stop, device=query.device)
        k_pos = torch.arange(first_key, offset + stop, device=query.device)
        allowed = _allowed(q_pos, k_pos, window, key_padding_mask)
        k_block, v_block = key[:, :, first_key : offset + stop], value[:, :, first_key : offset + stop]
        k_block, v_block, allowed = _with_sinks(k_block, v_block, allowed, sinks)
        out = _block_attention(grouped[:, :, :, start:stop], k_block, v_block, allowed, scaling, dropout, training)
        outputs.append(out)
    return torch.cat(outputs, dim=1).to(query.dtype)

"""Document-masked attention for packed rows on PyTorch's own flash kernel (``attn: varlen``).

Packing several documents into one row only stays correct if each document attends to itself.
flash-attention 2 does that from ``position_ids`` but needs a wheel built for the exact torch and
CUDA; PyTorch ≥ 2.10 ships the same varlen kernel as ``torch.nn.attention.varlen.varlen_attn``.
This module registers it with transformers under the name ``varlen``, so
``attn_implementation="varlen"`` works like ``flash_attention_2`` with nothing extra installed.
Documents start where ``position_ids`` restart at 0. On CPU (tests, tiny models) each document
goes through SDPA on its own, which gives the same result more slowly.
"""

from __future__ import annotations

import inspect

import torch

NAME = "varlen"


def packed_kwargs(position_ids: torch.Tensor, max_length: int | None = None) -> dict:
    """Cumulative document offsets over the flattened batch, as transformers' FA kwargs.

    ``max_length`` may be any upper bound of the longest document (the row length keeps it
    constant, so compiled graphs do not specialise on it); by default it is measured.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids must restart at 0 at the start of every row and document")
    end = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    if max_length is None:
        max_length = int((cu[1:] - cu[:-1]).max())
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def _flash(q, k, v, cu, max_len: int, scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of the key/value head
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if scale is not None and "scale" in params:
        extra["scale"] = scale
    if "is_causal" in params:
        extra["is_causal"] = True
    else:  # torch 2.11 spells causal as a window: everything before, nothing after
        extra["window_size"] = (-1, 0)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


def _per_document(q, k, v, cu, scale: float | None) -> torch.Tensor:
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=gqa,
        ).transpose(0, 1)
    return out


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim)."""
    if attention_mask is not None:
        raise ValueError("attn 'varlen' takes packed rows without padding (no attention_mask)")
    if dropout:
        raise ValueError("attn 'varlen' does not support attention dropout")
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        fa = packed_kwargs(kwargs["position_ids"])
        cu, max_len = fa["cu_seq_lens_q"], fa["max_length_q"]
    batch, heads, seq, dim = query.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    if q.is_cuda:
        out = _flash(q, k, v, cu, max_len, scaling)
    else:
        out = _per_document(q, k, v, cu, scaling)
    return out.view(batch, seq, heads, dim), None


def parity(device: str = "cuda", docs: tuple[int, ...] = (300, 1200, 596)) -> float:
    """Largest |difference| between this device's kernel and per-document SDPA (bf16 inputs)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    total, dim = sum(docs), 128
    q, k, v = (
        torch.randn(total, h, dim, generator=gen).to(device, torch.bfloat16) for h in (28, 4, 4)
    )
    pos = torch.cat([torch.arange(n) for n in docs]).to(device)
    cu = packed_kwargs(pos)["cu_seq_lens_q"]
    scale = dim**-0.5
    fast = _flash(q, k, v, cu, max(docs), scale) if q.is_cuda else _per_document(q, k, v, cu, scale)
    ref = _per_document(q.float(), k.float(), v.float(), cu, scale)
    return float((fast.float() - ref).abs().max())


def register() -> str:
    """Make ``attn_implementation="varlen"`` known to transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention)
    # the 2-D padding mask reaches the attention only where there is padding, which it refuses
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME

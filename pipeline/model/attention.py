"""Flash attention from the torch install itself, registered with transformers as `torch_varlen`
(not "…flash…": transformers takes every attention name containing "flash" for the flash-attn
package or a hub kernel).

PyTorch ships FlashAttention kernels of its own: `torch.nn.attention.varlen.varlen_attn` for
variable-length (packed) sequences, and SDPA's flash backend for unmasked batches. Registered through
transformers' `AttentionInterface`, they make flash attention a property of the torch a GPU node
already has, where the flash-attn package needs a prebuilt wheel for the exact torch/CUDA/Python or
an hour of compiling.

Which kernel runs, per attention call:
- packed rows (the collate's `cu_seq_lens`/`max_length`, handed in by pipeline.train.step, or
  derived from `position_ids` as transformers does for flash-attn): `varlen_attn`, causal, one
  segment per sample; no mask is ever materialised;
- a right-padded batch (a 2D padding mask): the padding is dropped and the rows go through
  `varlen_attn` as segments (flash-attn's unpad path);
- no mask, queries as long as keys (training, the vision tower): SDPA restricted to its flash
  backend, so a batch it cannot take fails loudly instead of falling back to a slower kernel;
- a decoding step against a cache (fewer queries than keys): SDPA with an explicit mask.

Masks are prepared as for flash-attn (transformers' `flash_attention_mask`): the 2D padding mask when
a row has padding, else None; nothing of size T² is ever built, for a packed row least of all.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

TORCH_VARLEN = "torch_varlen"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch: the preflight refuses torch_varlen
    _torch_varlen_attn = None

# varlen_attn's signature grew: torch 2.10/2.11 take `is_causal`, 2.12+ `window_size=(-1, 0)` for
# causal and `enable_gqa`; a bare GPU image may carry an older torch than our pin.
_VARLEN_PARAMETERS = set(inspect.signature(_torch_varlen_attn).parameters) if _torch_varlen_attn else set()


def available() -> bool:
    return _torch_varlen_attn is not None


def varlen_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, causal):
    """torch's varlen flash kernel, on [total tokens, heads, head dim] tensors. The one place that
    calls it (tests substitute a reference of its semantics: it has no CPU implementation)."""
    kwargs = {"scale": scale}
    if "window_size" in _VARLEN_PARAMETERS:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMETERS:
            kwargs["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    return _torch_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)


def torch_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D]
    → ([B, Tq, Hq, D], no weights)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    lengths = _segments(kwargs, attention_mask, batch, q_len, k_len, causal)
    if lengths is None:
        return _sdpa(query, key, value, attention_mask, dropout, scaling, causal), None
    if dropout:
        raise ValueError(f"{TORCH_VARLEN}: varlen attention has no dropout, but {type(module).__name__} asks for "
                         f"{dropout}: set the model's attention_dropout to 0 or use attn_implementation=sdpa")
    cu_seq_lens, max_length, kept = lengths
    # [B, H, T, D] -> [B*T, H, D], the layout of packed tokens
    q, k, v = (t.transpose(1, 2).reshape(batch * t.shape[2], t.shape[1], head_dim) for t in (query, key, value))
    if kept is not None:
        q, k, v = q[kept], k[kept], v[kept]
    out = varlen_kernel(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling, causal=causal)
    if kept is not None:
        full = out.new_zeros(batch * q_len, heads, head_dim)
        full[kept] = out
        out = full
    return out.view(batch, q_len, heads, head_dim), None


def _segments(kwargs: dict, attention_mask, batch: int, q_len: int, k_len: int, causal: bool):
    """(cu_seq_lens, max_length, kept token indices or None) for the varlen kernel, or None when
    the call goes to SDPA."""
    if kwargs.get("cu_seq_lens_q") is not None:  # the collate built them for a packed batch
        if attention_mask is not None:
            raise ValueError(f"{TORCH_VARLEN}: a packed batch (cu_seq_lens) must come without an attention mask")
        return kwargs["cu_seq_lens_q"], kwargs["max_length_q"], None
    if q_len != k_len or not causal:
        return None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(f"{TORCH_VARLEN} takes a 2D padding mask, got shape {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu_seq_lens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cu_seq_lens, int(lengths.max()), mask.reshape(-1).nonzero().squeeze(1)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and batch * q_len > 1:
        # packed rows from a caller that built no boundaries: derived in every layer, like flash-attn
        (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(position_ids.expand(batch, -1))
        if cu_q.numel() > batch + 1:
            return cu_q, max_q, None
    return None


def _sdpa(query, key, value, attention_mask, dropout, scaling, causal):
    q_len, k_len = query.shape[2], key.shape[2]
    gqa = key.shape[1] != query.shape[1]
    if attention_mask is None and (q_len == k_len or not causal):
        # the flash backend only: a batch it cannot take fails here instead of running slower
        backends = [SDPBackend.FLASH_ATTENTION]
        mask, is_causal = None, causal and q_len > 1
    else:  # decoding against a cache: the new queries see every cached key and themselves
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        if causal:
            mask = mask.tril(k_len - q_len)
        if attention_mask is not None:
            mask = mask[None, None] & attention_mask.bool()[:, None, None, -k_len:]
        is_causal = False
    if gqa and mask is not None:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
        gqa = False
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             is_causal=is_causal, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


AttentionInterface.register(TORCH_VARLEN, torch_varlen_attention)
AttentionMaskInterface.register(TORCH_VARLEN, flash_attention_mask)

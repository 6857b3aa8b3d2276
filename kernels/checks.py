"""Input validators shared by the launchers: fail fast, with the offending shapes in the message."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_index(name: str, t: torch.Tensor, device: torch.device, length: int | None = None) -> None:
    """An int32, 1-D index tensor on ``device`` (of ``length`` elements when given)."""
    if t.dtype != torch.int32 or t.dim() != 1:
        _fail(f"{name} must be a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        _fail(f"{name} is on {t.device}, expected {device}")
    if length is not None and t.numel() != length:
        _fail(f"{name} must have {length} elements, got {t.numel()}")


def check_cascade_inputs(q, k_buffer, v_buffer, group_indptr, prefix_kv_indptr, prefix_kv_indices,
                         suffix_kv_indptr, suffix_kv_indices, out) -> None:
    """Validates the arguments of ``packed_cascade_attention`` (see its docstring)."""
    if q.dim() != 3 or k_buffer.dim() != 3 or k_buffer.shape != v_buffer.shape:
        _fail(f"q must be [num_tokens, num_qo_heads, head_dim] and k/v_buffer "
              f"[num_slots, num_kv_heads, head_dim]; got q {tuple(q.shape)}, k {tuple(k_buffer.shape)}, "
              f"v {tuple(v_buffer.shape)}")
    num_tokens, num_qo_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if k_buffer.shape[2] != head_dim or num_qo_heads % num_kv_heads:
        _fail(f"head_dim/GQA mismatch: q {tuple(q.shape)}, k_buffer {tuple(k_buffer.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k_buffer.dtype != q.dtype or v_buffer.dtype != q.dtype:
        _fail(f"dtypes must be one of fp16/bf16 and equal: q {q.dtype}, k {k_buffer.dtype}, v {v_buffer.dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        _fail(f"head_dim {head_dim} not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if q.stride(2) != 1 or k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1:
        _fail("q, k_buffer and v_buffer must be contiguous in head_dim")
    dev = q.device
    if k_buffer.device != dev or v_buffer.device != dev:
        _fail(f"q on {dev}, k_buffer on {k_buffer.device}, v_buffer on {v_buffer.device}")
    num_groups = group_indptr.numel() - 1
    check_index("group_indptr", group_indptr, dev)
    check_index("prefix_kv_indptr", prefix_kv_indptr, dev, num_groups + 1)
    check_index("prefix_kv_indices", prefix_kv_indices, dev)
    check_index("suffix_kv_indptr", suffix_kv_indptr, dev, num_tokens + 1)
    check_index("suffix_kv_indices", suffix_kv_indices, dev)
    if out is not None and (out.shape != q.shape or out.device != dev or out.stride(2) != 1):
        _fail(f"out must be like q {tuple(q.shape)} on {dev}; got {tuple(out.shape)} on {out.device}")

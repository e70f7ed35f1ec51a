"""Kernels that fail the way real ones do on a GPU: crash, hang, run out of memory, keep bad state.

Each has F.scaled_dot_product_attention's signature, so it runs as a user kernel
(`--impl tests.faulty_kernels:abort`) in a worker process. The reliability tests run
them in the same run as healthy kernels, whose results must survive.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def healthy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Correct: the math backend."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)


def abort(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Kills its process with SIGABRT, like a failed assertion in a C++/HIP kernel."""
    os.write(2, b"faulty_kernels.abort: assertion `tile < num_tiles' failed\n")
    os.abort()


def hang(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Never returns (a deadlocked kernel); only a timeout ends it."""
    while True:
        time.sleep(60)


def oom(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Runs out of device memory."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected by faulty_kernels.oom)")


def wrong_shape(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Returns (B, L, H, D) instead of (B, H, L, D)."""
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa).transpose(1, 2)


def raises(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Raises an ordinary exception."""
    raise ValueError("injected failure: tile scheduler got 0 blocks")


def device_fault(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """A sticky device error: after it the CUDA/HIP context is unusable, so the process must go."""
    raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by faulty_kernels)")


# --- stateful: a plan cache keyed by shape that ignores grad_out's layout -----------------------

_PLANS: dict[tuple[int, ...], tuple[int, ...]] = {}


class _PlannedBackward(torch.autograd.Function):
    """Identity forward; backward reads grad_out through the strides of the plan first built for this shape."""

    @staticmethod
    def forward(ctx, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        strides = _PLANS.setdefault(tuple(grad.shape), tuple(grad.stride()))
        if strides != tuple(grad.stride()):
            # the cached plan's strides on this tensor's storage: the bug (right on the first layout seen)
            grad = torch.as_strided(grad, grad.shape, strides, grad.storage_offset())
        return grad


def stateful(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Right on the first call for a shape; wrong when a later call of that shape brings another grad_out layout."""
    return _PlannedBackward.apply(healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa))


def gated(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Correct, but on q_len 48 it waits until the file named by $GQA_TEST_GATE exists: a run to interrupt."""
    gate = os.environ.get("GQA_TEST_GATE")
    if gate and query.shape[-2] == 48:
        while not os.path.exists(gate):
            time.sleep(0.05)
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def wrong_signature(q, k, v):
    """Not F.scaled_dot_product_attention's signature: --impl must refuse it up front."""
    return q


# --- real device faults (GPU only): what the injected ones above stand in for on the CPU ---------


def device_assert(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """An out-of-bounds gather on the device: a device-side assert, after which the context is unusable."""
    table = torch.zeros(4, device=query.device)
    table[torch.tensor([1 << 20], device=query.device)].sum().item()
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def real_oom(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Asks the device for 16 TiB: a real torch.OutOfMemoryError from the caching allocator."""
    torch.empty(1 << 42, dtype=torch.float32, device=query.device)
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def device_assert(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """A real sticky device error on a GPU: an out-of-bounds gather trips a device-side assert, after which
    every call in the process fails. On the CPU the same index is an ordinary IndexError."""
    index = torch.tensor([query.shape[0] + 7], device=query.device)
    query = query[index]
    torch.cuda.synchronize(query.device) if query.is_cuda else None
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def detached(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Right numbers, but the output is cut off the autograd graph: no gradient reaches q, k, v."""
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa).detach()


def flips_math_reduction(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    """Correct itself, but leaves the math backend allowed to reduce fp16/bf16 in low precision."""
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    return healthy(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)

"""`varlen-attn`: torch.nn.attention.varlen_attn, the case packed as variable-length sequences.

Each batch is one sequence: its queries, and its keys up to its own length (a `padding` mask's kept
prefix; every key without a mask), packed into (total tokens, heads, dim) with cumulative sequence
lengths. Unequal lengths are what varlen exists for and where its offsets can go wrong (pytorch#173469:
NaN with window (-1, -1) on ROCm). The output is unpacked to (B, H, Lq, Dv); gradients reach q, k, v
through the packing, zero for padded keys, as the oracle of the padded case has them: the oracle of the
case is the oracle of each sequence.
"""

from __future__ import annotations

import inspect

import torch

from ..core.case import Case
from .base import DeviceFacts, Implementation, SdpaCall

# torch >= 2.10 has varlen_attn; absent, the implementation is UNSUPPORTED with torch's own ImportError (ABSENT).
# Imported on first use, not here: torch.nn.attention.varlen imports torch._dynamo, 1-2 s of every process's
# start-up (each gqa-harness command, each kernel worker) that only a device running varlen needs.
varlen_attn = None
ABSENT: str | None = None


def _probe() -> str | None:
    """Imports varlen_attn once; ABSENT (why this torch has none), or None where it has it."""
    global varlen_attn, ABSENT
    if varlen_attn is None and ABSENT is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as found  # imports torch._dynamo: on first use
            varlen_attn = found
        except ImportError as exc:  # pragma: no cover - depends on the installed torch
            ABSENT = f"this torch ({torch.__version__}) has no torch.nn.attention.varlen.varlen_attn: {exc}"
    return ABSENT


def _keywords(hq: int, hkv: int) -> dict:
    """`enable_gqa` where this torch's varlen_attn takes it. torch 2.11's has no such keyword (seen on an H100:
    TypeError); its flash kernel takes fewer kv heads than query heads as they are, as FlashAttention-2 does."""
    if hq != hkv and "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return {"enable_gqa": True}
    return {}


def _available(facts: DeviceFacts) -> str | None:
    if facts.kind == "cpu":
        return ("torch.nn.attention.varlen_attn runs only the flash kernel, which has no CPU backend "
                "(aten::_flash_attention_forward is not implemented for 'CPU')")
    return None


def _supports(case: Case, facts: DeviceFacts) -> str | None:
    absent = _probe()
    if absent:
        return absent
    if case.dtype == "fp32":
        return "varlen_attn runs the flash kernel: fp16 and bf16 only"
    if case.mask not in ("none", "padding") or (case.mask == "padding" and case.mask_fill != "-inf"):
        return f"mask={case.mask!r} (fill {case.mask_fill}) is not a per-sequence key length: varlen takes none"
    if case.causal != "none" and (case.mask != "none" or case.q_len != case.kv_len):
        return "causal with unequal query and key lengths: varlen aligns its causal window per sequence"
    if case.value_dim != case.head_dim:
        # torch 2.11 on an H100 raised "v must have shape (total_k, num_heads_k, head_size_og)" for d192/dv128
        return f"value head dim {case.value_dim} != query/key head dim {case.head_dim}: varlen_attn takes one head size"
    if case.head_dim % 8 or case.head_dim > 256:
        # torch 2.11 on an H100: "head_size must be a multiple of 8, this is ensured by padding!" (d203) and
        # "FlashAttention forward only supports head dimension at most 256" (d512); varlen_attn does not pad
        return f"head dim {case.head_dim}: varlen_attn's flash kernel takes multiples of 8 up to 256, unpadded"
    return None


def key_lengths(call: SdpaCall) -> list[int]:
    """Each batch's key length: all keys, or the kept prefix of a padding mask (checked to be a prefix)."""
    case, mask = call.case, call.attn_mask
    if case.mask == "none" or not isinstance(mask, torch.Tensor):  # a causal bias is not a length
        return [case.kv_len] * case.batch
    keep = mask[:, 0, 0, :].bool()
    lengths = [int(n) for n in keep.sum(-1).tolist()]
    prefix = torch.arange(case.kv_len, device=keep.device)[None, :] < torch.tensor(lengths, device=keep.device)[:, None]
    if not torch.equal(keep, prefix) or not bool((mask == mask[:, :1, :1, :]).all()):
        raise ValueError("the padding mask is not a per-batch key prefix, the same for every query: not varlen")
    return lengths


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def forward(call: SdpaCall) -> torch.Tensor:
    _probe()
    b, hq, lq, _ = call.query.shape
    lengths = key_lengths(call)
    q = torch.cat([call.query[i].transpose(0, 1) for i in range(b)])
    k = torch.cat([call.key[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])
    v = torch.cat([call.value[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])
    device = call.query.device
    call.notes["varlen"] = f"cu_seq_k {_cumulative(lengths, torch.device('cpu')).tolist()}"
    out = varlen_attn(q, k, v, _cumulative([lq] * b, device), _cumulative(lengths, device), lq, max(lengths),
                      scale=call.scale, window_size=(-1, 0) if call.case.causal != "none" else (-1, -1),
                      **_keywords(hq, k.shape[1]))
    return out.view(b, lq, hq, out.shape[-1]).transpose(1, 2)


def implementations() -> list[Implementation]:
    return [Implementation(
        name="varlen-attn", family="varlen", forward=forward, available=_available, supports=_supports,
        description="torch.nn.attention.varlen_attn on the case packed per batch (cu_seq_k from its key lengths)",
    )]

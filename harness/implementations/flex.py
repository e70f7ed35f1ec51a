"""FlexAttention with enable_gqa=True, compiled as users run it.

The case is translated the way a user writes it for flex:
- causal as a `mask_mod` (top-left: q_idx >= kv_idx; bottom-right: the diagonal
  shifted by Lk - Lq) turned into a block-sparse `BlockMask`;
- a boolean mask as a `mask_mod` that indexes the mask tensor (and-ed with the causal one);
- an additive float mask as a `score_mod` that adds the bias to the score.
`h` in a mod is the query head (flex broadcasts kv heads under enable_gqa).

On the CPU, torch 2.13's flex has no backward (it raises for inputs that require
grad); the adapter then runs it on detached inputs, so the output has no autograd
graph and the runner records the gradients as UNSUPPORTED forward-only, with
torch's message in the notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.case import Case
from .base import DeviceFacts, Implementation, SdpaCall
from .compiled import DEFAULT_COMPILER, OPT_IN, run_compiled

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlexMods:
    """The case as flex takes it: a mask_mod for the block mask (or None: dense) and a score_mod."""

    mask_mod: MaskMod | None
    score_mod: ScoreMod | None
    mask_batched: bool  # the mask_mod depends on (b, h): the block mask needs B and H, not broadcast
    how: str  # one line for the report notes


def causal_offset(case: Case) -> int | None:
    """Key index of query 0's diagonal: 0 top-left (torch's is_causal), Lk - Lq bottom-right; None: not causal."""
    if case.causal == "none":
        return None
    return case.kv_len - case.q_len if case.causal == "bottom-right" else 0


def causal_mask_mod(offset: int) -> MaskMod:
    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx
    return causal


def bool_mask_mod(mask: torch.Tensor, q_heads: int) -> MaskMod:
    full = mask.expand(mask.shape[0], q_heads, *mask.shape[2:])

    def keep(b, h, q_idx, kv_idx):
        return full[b, h, q_idx, kv_idx]
    return keep


def additive_score_mod(bias: torch.Tensor, q_heads: int) -> ScoreMod:
    full = bias.expand(bias.shape[0], q_heads, *bias.shape[2:])

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + full[b, h, q_idx, kv_idx]
    return add_bias


def and_mask_mods(first: MaskMod, second: MaskMod) -> MaskMod:
    def both(b, h, q_idx, kv_idx):
        return first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)
    return both


def translate(call: SdpaCall) -> FlexMods:
    """The case's causal alignment and mask as flex mods. The call's attn_mask already has causal
    folded in when the case has both; and-ing the causal mod again is idempotent and keeps the
    block mask as sparse as a user's would be."""
    case = call.case
    offset = causal_offset(case)
    mask_mod = causal_mask_mod(offset) if offset is not None else None
    how = [f"causal mask_mod (offset {offset})"] if offset is not None else []
    from torch.nn.attention.bias import CausalBias  # here: the module imports torch._dynamo (~1-2 s)

    # CausalBias (bottom-right) is a Tensor subclass; its causal part is already the mask_mod above.
    tensor = call.attn_mask if isinstance(call.attn_mask, torch.Tensor) and not isinstance(call.attn_mask, CausalBias) else None
    score_mod = None
    if tensor is not None and tensor.dtype == torch.bool:
        keep = bool_mask_mod(tensor, call.query.shape[1])
        mask_mod = keep if mask_mod is None else and_mask_mods(mask_mod, keep)
        how.append("bool mask as mask_mod")
    elif tensor is not None:
        score_mod = additive_score_mod(tensor, call.query.shape[1])
        how.append("additive mask as score_mod")
    return FlexMods(mask_mod, score_mod, mask_batched=tensor is not None and tensor.dtype == torch.bool,
                    how="; ".join(how) or "dense")


def block_mask_for(mods: FlexMods, call: SdpaCall):
    from torch.nn.attention.flex_attention import create_block_mask  # absent from some torch builds: _available

    if mods.mask_mod is None:
        return None
    b, h = (call.query.shape[0], call.query.shape[1]) if mods.mask_batched else (None, None)
    return create_block_mask(mods.mask_mod, b, h, call.query.shape[2], call.key.shape[2], device=call.query.device)


def no_backward_reason(exc: BaseException | None) -> str | None:
    """torch's refusal of flex backward on this device (CPU, MPS in 2.13), raised before any kernel
    runs; under fullgraph dynamo re-raises it as a graph break with the NotImplementedError as cause."""
    while exc is not None:
        text = str(exc)
        if "does not support backward" in text:
            return text[text.find("FlexAttention"):].splitlines()[0].rstrip("')\"") if "FlexAttention" in text else text
        exc = exc.__cause__
    return None


def flex_forward(compiler: str = DEFAULT_COMPILER,
                 translate_fn: Callable[[SdpaCall], FlexMods] = translate) -> Callable[[SdpaCall], torch.Tensor]:
    """`translate_fn` is swappable so tests can show a wrong translation FAILs the verdict."""

    def forward(call: SdpaCall) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention  # absent from some builds: _available

        mods = translate_fn(call)
        block_mask = block_mask_for(mods, call)
        call.notes["flex"] = mods.how

        def attend(query, key, value):
            return flex_attention(query, key, value, score_mod=mods.score_mod, block_mask=block_mask,
                                  scale=call.scale, enable_gqa=call.enable_gqa)

        args = (call.query, call.key, call.value)
        try:
            return run_compiled(attend, args, compiler, call.notes)
        except Exception as exc:
            reason = no_backward_reason(exc)
            if reason is None:
                raise
            call.notes["forward_only"] = reason
            return run_compiled(attend, tuple(t.detach() for t in args), compiler, call.notes)

    return forward


def _available(facts: DeviceFacts) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401 - the probe: absent from some torch builds
    except ImportError as exc:
        return f"this torch has no torch.nn.attention.flex_attention ({exc})"
    if not torch._dynamo.is_dynamo_supported():
        return "flex_attention needs torch.compile, which this Python/platform does not support"
    return None


def implementations(compiler: str = DEFAULT_COMPILER) -> list[Implementation]:
    return [Implementation(
        name="flex", family="flex", forward=flex_forward(compiler), available=_available, opt_in=OPT_IN,
        description=f"torch.compile({compiler}) flex_attention, enable_gqa=True; causal and bool masks as "
                    "mask_mod/BlockMask, additive masks as score_mod (forward-only where torch has no flex backward)",
    )]

"""Checks of what callers hand the decoders: token ids, attention masks (clear errors up front)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_token_ids(input_ids, device: torch.device | None, vocab_size: int) -> Tensor:
    """``input_ids`` [B, T] (or [T]) int64/int32 on ``device`` (None: any device) with ids in
    [0, vocab_size) -> int64 [B, T]."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(
            f"clasp_ext: input_ids must be a torch.Tensor, got {type(input_ids).__name__}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"clasp_ext: input_ids must be int64 (or int32) token ids, got {input_ids.dtype}"
        )
    if device is not None and input_ids.device != device:
        raise ValueError(
            f"clasp_ext: input_ids is on {input_ids.device} but the model is on "
            f"{device}; move it with input_ids.to(model.device)"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(
            f"clasp_ext: input_ids must be [B, T] (or [T]), got shape {tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"clasp_ext: empty prompt (input_ids has shape {tuple(input_ids.shape)})")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"clasp_ext: token ids must be in [0, {vocab_size}), got [{lo}, {hi}]")
    return input_ids.long()


def unpadded_rows(ids: Tensor, attention_mask) -> list[list[int]]:
    """[B, T] ids with an optional [B, T] 0/1 mask -> each row's tokens where the mask is 1.
    Padding may sit on either side (left, as model.generate wants it for decoder-only models, or
    right), but not inside a row."""
    if attention_mask is None:
        return ids.tolist()
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != ids.shape:
        shape = getattr(attention_mask, "shape", None)
        raise ValueError(
            f"clasp_ext: attention_mask must be a tensor of the shape of input_ids "
            f"{tuple(ids.shape)}, got {tuple(shape) if shape is not None else type(attention_mask)}"
        )
    rows = []
    for b, (row, m) in enumerate(zip(ids.tolist(), attention_mask.tolist(), strict=True)):
        if any(x not in (0, 1) for x in m):
            raise ValueError("clasp_ext: attention_mask must hold only 0 and 1")
        kept = [i for i, x in enumerate(m) if x]
        if not kept:
            raise ValueError(f"clasp_ext: row {b} of the batch is all padding (empty prompt)")
        if kept[-1] - kept[0] + 1 != len(kept):
            raise ValueError(
                f"clasp_ext: row {b}'s attention_mask has padding inside the prompt; pad on the "
                "left (or right) only"
            )
        rows.append(row[kept[0] : kept[-1] + 1])
    return rows

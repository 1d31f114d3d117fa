"""MixMatch's interleaving of the K + 1 forward batches (mixmatch ``libml/layers.py`` ``interleave``).

MixMatch runs the mixed labelled batch and the K mixed unlabelled batches through the network one after the
other and keeps the BatchNorm statistics of the FIRST forward only. So that this first batch is
representative, the batches are cut into K + 1 slices and slice ``i`` of batch 0 is swapped with slice ``i``
of batch ``i``: afterwards batch 0 holds slice 0 of the labelled batch and slice ``i`` of every unlabelled
batch ``i``. Swapping is its own inverse: :func:`deinterleave` (the same swap) restores the order of the
outputs (logits) afterwards.
"""
from __future__ import annotations

import torch
from torch import Tensor


def interleave_offsets(batch: int, num_batches: int) -> list[int]:
    """Slice boundaries of a batch of ``batch`` rows cut into ``num_batches`` near-equal slices, the larger
    slices last (as the official code): e.g. ``(10, 3) -> [0, 3, 6, 10]``."""
    sizes = [batch // num_batches] * num_batches
    for k in range(batch - sum(sizes)):
        sizes[-1 - k] += 1
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return offsets


def interleave(batches: list[Tensor]) -> list[Tensor]:
    """Swap slice ``i`` of ``batches[0]`` with slice ``i`` of ``batches[i]`` for ``i = 1..K``; the batches
    must have the same number of rows."""
    if len(batches) < 2:
        return list(batches)
    batch = batches[0].shape[0]
    if any(b.shape[0] != batch for b in batches):
        raise ValueError(f"interleave needs batches of equal size, got {[b.shape[0] for b in batches]}")
    offsets = interleave_offsets(batch, len(batches))
    pieces = [[b[offsets[p]:offsets[p + 1]] for p in range(len(batches))] for b in batches]
    for i in range(1, len(batches)):
        pieces[0][i], pieces[i][i] = pieces[i][i], pieces[0][i]
    return [torch.cat(p, dim=0) for p in pieces]


deinterleave = interleave  # the swap is an involution

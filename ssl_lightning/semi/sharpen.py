"""MixMatch's temperature sharpening of a label guess (mixmatch ``mixmatch.py`` ``guess_label``)."""
from __future__ import annotations

import torch
from torch import Tensor


def sharpen(probs: Tensor, temperature: float = 0.5) -> Tensor:
    """``p_c^(1/T) / sum_k p_k^(1/T)`` along dim 1, computed as ``softmax(log p / T)`` so that a small ``T``
    neither underflows nor divides 0 by 0. ``T = 1`` returns ``p`` (normalised); ``T -> 0`` gives the one-hot
    of the argmax."""
    if temperature <= 0:
        raise ValueError(f"sharpen needs a temperature > 0, got {temperature}")
    return torch.softmax(torch.log(probs) / temperature, dim=1)

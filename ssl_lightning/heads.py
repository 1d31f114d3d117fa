"""Shared head builders: every projector and predictor in the package is an :func:`mlp`."""
from __future__ import annotations

from torch import nn


def mlp(
    dims: list[int],
    norm: str = "batch",
    last_norm: bool = False,
    last_affine: bool = True,
    last_bias: bool = True,
    last_center: bool = True,
) -> nn.Sequential:
    """``Linear -> Norm -> ReLU`` for every hidden layer, then a final ``Linear``.

    Args:
        dims: widths ``[in, hidden..., out]``; ``[in, out]`` gives a single linear layer.
        norm: ``"batch"`` (BatchNorm1d) or ``"none"`` for the hidden layers.
        last_norm: add a BatchNorm1d after the last layer (SimSiam, SimCLR v2 style projectors).
        last_affine: whether that last BatchNorm has learnable scale and shift.
        last_bias: bias on the last linear layer (a following BatchNorm makes it redundant).
        last_center: whether that last affine BatchNorm learns its shift; False keeps the scale only (the
            shift stays 0 and is not trained: SimCLR's official head, ``center=False``).

    >>> projector = mlp([512, 2048, 128], last_norm=True, last_center=False)  # SimCLR: 512 -> 2048 -> 128
    >>> predictor = mlp([256, 4096, 256])          # BYOL predictor
    """
    if len(dims) < 2:
        raise ValueError(f"mlp needs at least [in, out] widths, got {dims}")
    if norm not in ("batch", "none"):
        raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=norm == "none")]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias and not last_norm))
    if last_norm:
        bn = nn.BatchNorm1d(dims[-1], affine=last_affine)
        if last_affine and not last_center:
            bn.bias.requires_grad_(False)  # zero, never updated (optimizers and DDP skip it)
        layers.append(bn)
    return nn.Sequential(*layers)

"""MixUp as MixMatch uses it (mixmatch ``libml/layers.py`` ``MixMode.augment_pair``, mode ``xxy.yxy``).

``W = shuffle(concat(X, U))``; every sample ``i`` of ``concat(X, U)`` is mixed with partner ``W_i`` by its own
``lambda_i ~ Beta(alpha, alpha)``, ``lambda'_i = max(lambda_i, 1 - lambda_i)`` so that the mix stays closer to
its own sample (and its own loss term). Call :func:`mixup` once on the concatenation and split the result
back into labelled and unlabelled parts. ``per_example=False`` draws one lambda for the whole batch, the
convention of USB (``semilearn.algorithms.utils.mixup_one_target``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MixUpResult(NamedTuple):
    inputs: Tensor  # lambda' x + (1 - lambda') x[perm]
    targets: Tensor  # lambda' y + (1 - lambda') y[perm]
    lam: Tensor  # (N,) the lambda' of every sample (all equal with per_example=False)
    perm: Tensor  # (N,) the partner of sample i is sample perm[i]


def mix(inputs: Tensor, targets: Tensor, lam: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """``lam_i x_i + (1 - lam_i) x_perm[i]`` for inputs (N, ...) and targets (N, C); ``lam`` (N,) or a scalar."""
    lam = torch.as_tensor(lam, dtype=inputs.dtype, device=inputs.device).expand(inputs.shape[0])
    lam_x = lam.view(-1, *([1] * (inputs.ndim - 1)))
    lam_y = lam.to(targets.dtype).view(-1, *([1] * (targets.ndim - 1)))
    return lam_x * inputs + (1 - lam_x) * inputs[perm], lam_y * targets + (1 - lam_y) * targets[perm]


def sample_lambda(n: int, alpha: float, per_example: bool = True, keep_larger: bool = True,
                  device: torch.device | str | None = None) -> Tensor:
    """``n`` mixing weights ``~ Beta(alpha, alpha)`` (one shared weight if not ``per_example``), each replaced by
    ``max(lam, 1 - lam)`` if ``keep_larger``; all 1 (no mixing) for ``alpha <= 0``. Drawn from torch's
    global RNG (seeded by ``seed_everything``)."""
    if alpha <= 0:
        return torch.ones(n, device=device)
    a = torch.tensor(float(alpha), device=device)
    lam = torch.distributions.Beta(a, a).sample((n if per_example else 1,))
    if keep_larger:
        lam = torch.maximum(lam, 1 - lam)
    return lam.expand(n).clone()


@torch.no_grad()
def mixup(inputs: Tensor, targets: Tensor, alpha: float, per_example: bool = True, keep_larger: bool = True,
          perm: Tensor | None = None, lam: Tensor | None = None) -> MixUpResult:
    """MixUp of ``inputs`` (N, ...) with soft ``targets`` (N, C) against a random shuffle of themselves.

    ``perm`` and ``lam`` may be given (e.g. in tests); else ``perm`` is ``torch.randperm(N)`` and ``lam`` is
    :func:`sample_lambda`. No gradient flows through the mix (MixMatch's inputs and targets are both fixed).
    """
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"mixup: {n} inputs but {targets.shape[0]} targets")
    if perm is None:
        perm = torch.randperm(n, device=inputs.device)
    if lam is None:
        lam = sample_lambda(n, alpha, per_example, keep_larger, device=inputs.device)
    mixed_x, mixed_y = mix(inputs, targets, lam, perm)
    return MixUpResult(mixed_x, mixed_y, torch.as_tensor(lam).expand(n), perm)

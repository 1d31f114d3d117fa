"""GenPro, DiscPro and MuConPro: kernel-density objectives over several views per image (Kobayashi,
"Mutual Conditional Probability for Self-Supervised Learning"; no public code, the formula is the
authors' poster's).

Notation: image b of the batch, view i; ``z_bi`` the L2-normalised online output (anchor), ``x_bj``
the L2-normalised target of view j (momentum network, no gradient). With the *normalised* kernel
density estimates (a log-mean-exp, which only shifts each term by ``T log n`` at fixed T but makes the
limits finite)

    l_gen(b,i)  = -T log 1/(M-1) sum_{j != i} exp(z_bi . x_bj / T)
    l_disc(b,i) = l_gen(b,i) + T log 1/(BM-1) sum_{(c,j) != (b,i)} exp(z_bi . x_cj / T)
    l_muconpro  = l_gen + l_disc

each averaged over all anchors (b, i). The image set c runs over the *global* batch (targets are
gathered across processes) plus any memory-bank rows. ``T = inf`` and ``T = 0`` are the exact limits
of ``T log mean exp(s / T)``: the mean and the maximum of the scores s.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_lightning import distributed
from ssl_lightning.registry import SSLError

OBJECTIVES = ("muconpro", "genpro", "discpro")


def parse_temperature(value: float | int | str) -> float:
    """A temperature T >= 0 as a float; ``inf`` (float or the string ``"inf"``) and 0 are allowed."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise SSLError(f"temperature must be a number >= 0 or 'inf', got {value!r}; "
                       "e.g. `temperature: 1.0`, `temperature: 0` or `temperature: .inf`.") from None
    if math.isnan(t) or t < 0:
        raise SSLError(f"temperature must be >= 0 (0 = hard max, inf = mean), got {value!r}; "
                       "set model.init_args.temperature to e.g. 1.0.")
    return t


def soft_mean(scores: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
              dim: int = -1) -> torch.Tensor:
    """``T log mean_{k in mask} exp(s_k / T)`` along ``dim``, with its exact limits as branches:
    the masked maximum at ``T = 0`` and the masked mean at ``T = inf``. ``mask`` (broadcastable to
    ``scores``, True = in the set) must leave at least one entry per row."""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.expand_as(scores)
    if math.isinf(temperature):
        return scores.masked_fill(~mask, 0.0).sum(dim) / mask.sum(dim)
    if temperature == 0:
        return scores.masked_fill(~mask, float("-inf")).amax(dim)
    # = c + T log(1 + mean(expm1((s - c) / T))) with c the masked max: accurate in float32 at both ends
    # (a plain T * (logsumexp - log n) loses ~T * 1e-7 to cancellation at large T)
    shift = scores.detach().masked_fill(~mask, float("-inf")).amax(dim, keepdim=True)
    x = ((scores - shift) / temperature).masked_fill(~mask, float("-inf"))
    mean = torch.expm1(x).masked_fill(~mask, 0.0).sum(dim) / mask.sum(dim)
    return shift.squeeze(dim) + temperature * torch.log1p(mean)


def kde_terms(z: torch.Tensor, t: torch.Tensor, temperature: float, negatives: torch.Tensor | None = None,
              gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor ``(l_gen, l_disc)``, each of shape (A, B).

    Args:
        z: (A, B, D) online outputs of A views of the B local images (normalised here). Anchor view
            a < M is the view of target a; views a >= M (e.g. small crops) are anchors only, whose
            other-view set is all M targets of their image.
        t: (M, B, D) targets (detached and normalised here), M >= 2.
        negatives: (K, D) extra rows (a memory bank, already normalised) appended to the cross-image set.
        gather: under DDP, the cross-image set is the targets of the global batch (gathered, no gradient).
    """
    n_anchor, b, _ = z.shape
    m = t.shape[0]
    if m < 2 or n_anchor < m or t.shape[1] != b:
        raise SSLError(f"MuConPro needs >= 2 target views and at least as many anchor views over the same images; "
                       f"got anchors {tuple(z.shape)} and targets {tuple(t.shape)} (views x images x dim).")
    z = F.normalize(z, dim=-1)
    t = F.normalize(t.detach(), dim=-1)
    t_all, offset = t, 0
    if gather and distributed.world_size() > 1:  # (M, B, D) -> image-major gather -> (M, world*B, D)
        t_all = distributed.gather(t.transpose(0, 1).contiguous()).transpose(0, 1)
        offset = b * distributed.rank()
    scores = torch.einsum("abd,mcd->abmc", z, t_all)  # (A, B, M, B_global)
    dev = z.device
    same_image = (torch.arange(t_all.shape[1], device=dev) == torch.arange(b, device=dev)[:, None] + offset)
    same_view = torch.arange(n_anchor, device=dev)[:, None] == torch.arange(m, device=dev)  # (A, M)
    same_image, same_view = same_image[None, :, None, :], same_view[:, None, :, None]
    flat = scores.flatten(2)
    positive = soft_mean(flat, temperature, (same_image & ~same_view).flatten(2))  # j != i, same image
    cross_mask = ~(same_image & same_view).flatten(2)  # every (c, j) but the anchor's own target
    if negatives is not None and negatives.shape[0] > 0:
        neg = (z @ negatives.detach().to(z.dtype).T)  # (A, B, K)
        flat = torch.cat([flat, neg], dim=-1)
        cross_mask = torch.cat([cross_mask.expand(n_anchor, b, -1), torch.ones_like(neg, dtype=torch.bool)], dim=-1)
    cross = soft_mean(flat, temperature, cross_mask)
    return -positive, cross - positive


def muconpro_loss(z: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, objective: str = "muconpro",
                  negatives: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """``objective`` (genpro: l_gen, discpro: l_disc, muconpro: l_gen + l_disc) averaged over all A x B
    local anchors; see :func:`kde_terms` for the arguments. Each process averages over its own anchors,
    so DDP's gradient averaging gives the single-process gradient on the global batch."""
    if objective not in OBJECTIVES:
        raise SSLError(f"Unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}.")
    gen, disc = kde_terms(z, t, temperature, negatives, gather)
    if objective == "genpro":
        return gen.mean()
    if objective == "discpro":
        return disc.mean()
    return (gen + disc).mean()

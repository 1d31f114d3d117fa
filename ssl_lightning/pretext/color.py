"""Colorization's inputs and targets (Zhang, Isola & Efros, ECCV 2016; richzhang/colorization): L in, ab out as
classification over quantised in-gamut ab bins of a grid of 10, with soft-encoded targets and class
rebalancing. Colour conversion is ``kornia.color`` (the batched tensor port of ``skimage.color.rgb2lab``:
sRGB, D65, L in [0, 100]).

The bins. The official ``pts_in_hull.npy`` holds Q = 313 bins; recomputed here from the sRGB gamut, the
bins that some 8-bit sRGB colour quantises to (rounding ab to the nearest multiple of 10) number 261 --
every one of them among the official 313. The official set is larger: 309 of its bins are the corners of
the grid squares that sRGB colours fall in (``cover="neighbours"`` here gives exactly those 309), the
other 4 lie just beyond. Neither rule reproduces the official file; pass it as ``bins`` where the
published Q = 313 matters. Only 229 of the 261 bin centres are themselves in gamut (decode to RGB in
[0, 1] at some L): the boundary bins hold sRGB colours off their centre.
"""
from __future__ import annotations

import functools

import kornia.color
import torch
from torch import Tensor

from ssl_lightning.pretext.sampling import check_images
from ssl_lightning.registry import SSLError

GRID = 10
COVERS = ("nearest", "neighbours")
L_CENTRE, L_SCALE = 50.0, 100.0  # the network's input (L - 50) / 100
NN, SIGMA = 10, 5.0  # soft encoding: 10 nearest bins (the training code; the paper says 5), Gaussian sigma 5
LAMBDA = 0.5  # rebalancing: mix of the prior with a uniform distribution
GRAY_THRESHOLD = 5.0  # images with |a|, |b| <= 5 everywhere give no loss (NonGrayMaskLayer)


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB images (B, 3, H, W) in [0, 1] to CIE Lab (D65): L in [0, 100], a and b roughly in [-128, 127]."""
    check_images(x, "rgb_to_lab")
    if x.shape[1] != 3:
        raise SSLError(f"rgb_to_lab needs colour images (B, 3, H, W), got {x.shape[1]} channels: colorization "
                       "needs a colour dataset")
    return kornia.color.rgb_to_lab(x)


def lab_to_rgb(lab: Tensor, clip: bool = True) -> Tensor:
    """CIE Lab (B, 3, H, W) back to sRGB; ``clip`` to [0, 1] (out-of-gamut colours), or not (gamut tests)."""
    check_images(lab, "lab_to_rgb")
    return kornia.color.lab_to_rgb(lab, clip=clip)


def normalize_l(lightness: Tensor) -> Tensor:
    """The network's input: ``(L - 50) / 100``."""
    return (lightness - L_CENTRE) / L_SCALE


def lab_inputs(x: Tensor) -> tuple[Tensor, Tensor]:
    """RGB images (B, 3, H, W) in [0, 1] to the network's input ``(L - 50) / 100`` (B, 1, H, W) and the ab
    target (B, 2, H, W)."""
    lab = rgb_to_lab(x)
    return normalize_l(lab[:, :1]), lab[:, 1:]


def _cube_surface(levels: int) -> Tensor:
    """Every colour of the sRGB cube's six faces with ``levels`` values per channel, (1, 3, n, 1) float64."""
    v = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    u, w = (t.reshape(-1) for t in torch.meshgrid(v, v, indexing="ij"))
    faces = []
    for fixed in range(3):
        for value in (0.0, 1.0):
            channels = [u, w]
            channels.insert(fixed, torch.full_like(u, value))
            faces.append(torch.stack(channels))
    return torch.cat(faces, dim=1)[None, :, :, None]


@functools.lru_cache(maxsize=4)
def _gamut_bins(grid: float, cover: str) -> Tensor:
    # The ab projection of the gamut is that of the cube's surface (the top and bottom of each vertical
    # line through the solid lie on its boundary), so the faces' 8-bit colours give the same bins as all
    # 2^24 colours (checked: 261 both) at 1/40 of the cost.
    ab = rgb_to_lab(_cube_surface(256))[0, 1:, :, 0].T / grid  # (n, 2) in grid units
    if cover == "nearest":
        corners = [torch.round(ab)]
    else:
        low = torch.floor(ab)
        corners = [low + torch.tensor(d, dtype=ab.dtype) for d in ((0, 0), (0, 1), (1, 0), (1, 1))]
    cells = torch.cat(corners).long()
    low = cells.min(dim=0).values
    span = cells.max(dim=0).values - low + 1
    occupied = torch.zeros(int(span[0]), int(span[1]), dtype=torch.bool)
    occupied[cells[:, 0] - low[0], cells[:, 1] - low[1]] = True
    return (occupied.nonzero() + low).to(torch.float32) * grid  # row-major: sorted by a, then b (as the official file)


def ab_gamut_bins(grid: float = GRID, cover: str = "nearest") -> Tensor:
    """The in-gamut ab bins (Q, 2) of a grid of ``grid``: bin centres at multiples of ``grid``, sorted by a then b.
    ``cover="nearest"``: the bins some 8-bit sRGB colour quantises to (nearest centre; 261 at grid 10):
    every image's pixels quantise into the set. ``cover="neighbours"``: the 4 bins around every 8-bit sRGB
    colour (309 at grid 10, 309 of the official 313): soft encoding then always finds a colour's own
    surrounding bins. Cached (about 0.1 s on one CPU thread)."""
    if cover not in COVERS:
        raise SSLError(f"ab_gamut_bins: unknown cover {cover!r}; use one of {', '.join(COVERS)}")
    return _gamut_bins(float(grid), cover).clone()


def _squared_distances(ab: Tensor, bins: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(B * H * W, Q) squared distances of every pixel's ab to every bin centre, and the (B, H, W) shape."""
    if ab.ndim != 4 or ab.shape[1] != 2:
        raise SSLError(f"expected ab channels (B, 2, H, W), got {tuple(ab.shape)}: take lab[:, 1:] of rgb_to_lab")
    b, _, h, w = ab.shape
    pts = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    centres = bins.to(device=ab.device, dtype=ab.dtype)
    d2 = pts.pow(2).sum(1, keepdim=True) - 2 * pts @ centres.T + centres.pow(2).sum(1)
    return d2.clamp(min=0), (b, h, w)


def quantize_ab(ab: Tensor, bins: Tensor) -> Tensor:
    """Index of the nearest bin of every pixel of ``ab`` (B, 2, H, W): (B, H, W) long."""
    d2, shape = _squared_distances(ab, bins)
    return d2.argmin(dim=1).reshape(shape)


def soft_encode(ab: Tensor, bins: Tensor, nn: int = NN, sigma: float = SIGMA) -> Tensor:
    """Soft-encoded targets (B, Q, H, W): each pixel's ``nn`` nearest bins weighted by a Gaussian
    ``exp(-d^2 / (2 sigma^2))`` of their distance, normalised to sum to 1 (the official NNEncode); the other
    bins 0."""
    q = bins.shape[0]
    if not 1 <= nn <= q:
        raise SSLError(f"soft_encode: nn={nn} must be in 1..{q} (the number of bins)")
    d2, (b, h, w) = _squared_distances(ab, bins)
    near_d2, near = d2.topk(nn, dim=1, largest=False, sorted=False)
    weights = torch.softmax(-near_d2 / (2 * sigma ** 2), dim=1)  # = exp(-d^2 / 2 s^2) / sum, without underflow
    target = torch.zeros_like(d2).scatter_(1, near, weights)
    return target.reshape(b, h, w, q).permute(0, 3, 1, 2)


def bin_counts(ab: Tensor, bins: Tensor) -> Tensor:
    """How many pixels of ``ab`` (B, 2, H, W) fall in each bin (nearest centre): (Q,) float, to accumulate the
    empirical prior p over a dataset."""
    return torch.bincount(quantize_ab(ab, bins).reshape(-1), minlength=bins.shape[0]).to(ab.dtype)


def rebalance_weights(prior: Tensor, lam: float = LAMBDA) -> Tensor:
    """Class-rebalancing weights ``w ~ ((1 - lam) p + lam / Q)^-1`` normalised so that ``E_p[w] = sum_q p_q w_q = 1``
    (the official PriorFactor). ``prior`` (Q,): the empirical ab distribution p (counts are normalised
    here). A pixel's weight is that of its target's argmax bin (``w[soft_encode(...).argmax(1)]``)."""
    if prior.ndim != 1 or (prior < 0).any() or prior.sum() <= 0:
        raise SSLError("rebalance_weights expects the prior as a (Q,) tensor of non-negative counts or probabilities "
                       "with a positive sum: accumulate bin_counts over the training images")
    if not 0 <= lam <= 1:
        raise SSLError(f"rebalance_weights: lam={lam} must be in [0, 1] (the paper's 0.5)")
    p = prior / prior.sum()
    w = 1 / ((1 - lam) * p + lam / p.numel())
    return w / (p * w).sum()


def non_gray_mask(ab: Tensor, threshold: float = GRAY_THRESHOLD) -> Tensor:
    """(B,) bool: the images with some ``|a|`` or ``|b|`` above ``threshold``; the others (grey images) give no loss."""
    return (ab.abs() > threshold).flatten(1).any(dim=1)


# ---- the network's input spaces, decoding, L bins (split-brain) ------------------------------------------------
AB_SCALE = 110.0  # ab given as input (split-brain's ab -> L half): ab / 110, about [-1, 1]
ANNEAL_T = 0.38  # annealed-mean decoding temperature (the paper)
INPUT_SPACES = {"lightness": 1, "lab": 3}  # name -> channels: (L - 50) / 100; that and ab / 110


def refuse_gray(who: str, in_channels: int) -> None:
    """The colour methods' refusal of gray data (``in_channels`` != 3), naming the fix."""
    if in_channels != 3:
        raise SSLError(f"{who} needs colour images but the data has {in_channels} channel(s) (e.g. fashion_mnist is "
                       "gray): train it on a colour dataset (cifar10, imagenet100, synthetic_colour)")


def network_input(rgb: Tensor, space: str) -> Tensor:
    """sRGB images (B, 3, H, W) in [0, 1] to what a colour-method encoder takes: ``"lightness"`` (B, 1, H, W)
    ``(L - 50) / 100`` (Colorization), ``"lab"`` (B, 3, H, W) that and ``ab / 110`` (split-brain)."""
    if space not in INPUT_SPACES:
        raise SSLError(f"unknown colour input space {space!r}; use one of {', '.join(INPUT_SPACES)}")
    lightness, ab = lab_inputs(rgb)
    return lightness if space == "lightness" else torch.cat([lightness, ab / AB_SCALE], dim=1)


class ToNetworkInput:
    """Evaluation transform: an RGB image (PIL, or a uint8 / float tensor (3, H, W)) to :func:`network_input`'s
    float tensor (C, H, W), already normalised (follow it with an identity ``Normalize``)."""

    def __init__(self, space: str) -> None:
        if space not in INPUT_SPACES:
            raise SSLError(f"unknown colour input space {space!r}; use one of {', '.join(INPUT_SPACES)}")
        self.space = space

    def __call__(self, image) -> Tensor:
        from torchvision.transforms import v2

        x = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
        if x.shape[0] != 3:
            raise SSLError(f"a colour method's backbone needs RGB images, got {x.shape[0]} channel(s): evaluate it on a "
                           "colour dataset")
        return network_input(x[None], self.space)[0]


def annealed_mean(probs: Tensor, bins: Tensor, temperature: float = ANNEAL_T) -> Tensor:
    """Decode per-position bin distributions (B, Q, H, W) to ab (B, 2, H, W): the mean of the re-normalised
    ``z^(1/T)`` (the paper's annealed mean; T = 1 the mean, T -> 0 the mode)."""
    if temperature <= 0:
        raise SSLError(f"annealed_mean: temperature={temperature} must be > 0 (the paper's 0.38)")
    annealed = torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", annealed, bins.to(probs))


def quantize_l(lightness: Tensor, num_bins: int = 100) -> Tensor:
    """L (any shape, in [0, 100]) to ``num_bins`` equal bins of [0, 100] (split-brain's L targets), long."""
    if num_bins < 2:
        raise SSLError(f"quantize_l: num_bins={num_bins} must be >= 2 (the paper's 100)")
    return (lightness * (num_bins / 100.0)).floor().clamp(0, num_bins - 1).long()

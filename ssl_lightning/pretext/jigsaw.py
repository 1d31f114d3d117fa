"""Jigsaw puzzles (Noroozi & Favaro, ECCV 2016; bbrattoli/JigsawPuzzlePytorch): a 3 x 3 grid of tiles shuffled
by one of P permutations, and a P-way classification of the permutation.

The permutation set is the paper's Algorithm 1 (``select_permutations.py`` with ``--selection max``): start from
a random permutation and repeatedly add the candidate of largest MEAN Hamming distance to those chosen so far,
over all ``9! = 362,880`` candidates. It is part of the task's definition, so a method keeps it with the run:
register it as a buffer (``self.register_buffer("permutations", maximal_hamming_permutations(...))``), which
every checkpoint then holds; it is also a deterministic function of ``(num_tiles, num_perms, seed)``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from ssl_lightning.pretext.sampling import check_images, cpu_generator, crop_patches, randint
from ssl_lightning.registry import SSLError

TILE_FRACTION = 64 / 75  # the paper's 64 px tile in a 75 px cell
MAX_TILES = 10  # 10! candidates (36 MB) is the most the exhaustive greedy search holds


@functools.lru_cache(maxsize=2)
def _permutations(n: int) -> np.ndarray:
    if n == 1:
        return np.zeros((1, 1), dtype=np.uint8)
    rest = _permutations(n - 1)  # lexicographic order (itertools.permutations'), built block by block
    out = np.empty((n * rest.shape[0], n), dtype=np.uint8)
    for i, block in enumerate(np.split(out, n)):
        block[:, 0] = i
        block[:, 1:] = rest + (rest >= i)
    return out


def all_permutations(n: int) -> Tensor:
    """All ``n!`` permutations of ``0..n-1`` in lexicographic order, (n!, n) uint8."""
    if not 1 <= n <= MAX_TILES:
        raise SSLError(f"all_permutations: n={n} is outside 1..{MAX_TILES}: the exhaustive search over n! candidates "
                       f"is for up to {MAX_TILES} tiles")
    return torch.from_numpy(_permutations(n).copy())


def greedy_hamming(candidates: Tensor, num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Algorithm 1 on the rows of ``candidates`` (N, n), each a permutation of ``0..n-1``: a random first row, then
    each step the row of largest mean Hamming distance to the rows already chosen (the first such row on
    ties, as ``np.argmax`` in the repo). Returns the chosen indices (num,) and ``step_means`` (num,):
    ``step_means[i]`` is the mean Hamming distance (in positions) of the i-th choice to the i before it (0
    for the random start).

    The mean distance of a row to the i chosen rows is ``n - matches / i``, ``matches`` its number of positions
    agreeing with them; a step adds the new row's agreements, one position at a time over a column-major
    copy of the candidates (n contiguous passes over N bytes). In NumPy: a once-per-run CPU search whose
    single-threaded loop is fast (torch's intra-op threads only slow this many small steps down).
    """
    total_rows, n = candidates.shape
    if not 1 <= num <= total_rows:
        raise SSLError(f"greedy_hamming: cannot choose {num} of {total_rows} candidates: ask for 1..{total_rows}")
    columns = np.ascontiguousarray(candidates.cpu().numpy().T)  # (n, N)
    chosen = np.empty(num, dtype=np.int64)
    means = np.zeros(num, dtype=np.float64)
    chosen[0] = int(torch.randint(total_rows, (1,), generator=generator))
    matches = np.zeros(total_rows, dtype=np.int32)
    parked = 2**30  # chosen rows are parked far above any count of matches
    for i in range(1, num):
        last = columns[:, chosen[i - 1]]
        for k in range(n):
            matches += columns[k] == last[k]
        matches[chosen[i - 1]] = parked
        j = int(matches.argmin())  # the first row of fewest matches = of largest mean Hamming distance
        chosen[i], means[i] = j, n - matches[j] / i
    return torch.from_numpy(chosen), torch.from_numpy(means)


def maximal_hamming_permutations(num_tiles: int = 9, num_perms: int = 100, seed: int = 0) -> Tensor:
    """The jigsaw permutation set: ``num_perms`` permutations of ``num_tiles`` tiles chosen greedily by maximal mean
    Hamming distance (the paper uses 100 to 1000 of 9 tiles), (num_perms, num_tiles) long, seeded."""
    candidates = all_permutations(num_tiles)
    chosen, _ = greedy_hamming(candidates, num_perms, torch.Generator().manual_seed(seed))
    return candidates[chosen].long()


def hamming_matrix(perms: Tensor) -> Tensor:
    """(P, P) number of positions at which each two permutations differ."""
    return (perms[:, None, :] != perms[None, :, :]).sum(dim=-1)


def mean_hamming_distance(perms: Tensor) -> float:
    """Mean Hamming distance over the ``P (P - 1) / 2`` pairs of a permutation set."""
    p = perms.shape[0]
    return hamming_matrix(perms).triu(diagonal=1).sum().item() / math.comb(p, 2)


def grid_tiles(x: Tensor, grid: int = 3, tile: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Split each image into ``grid x grid`` cells (row-major; side ``H // grid``, the remainder at the bottom and
    right unused) and crop a ``tile x tile`` window at a random position in each cell (the paper's gaps
    against edge continuity; default side ``64/75`` of the cell). Returns (B, grid^2, C, tile, tile)."""
    check_images(x, "grid_tiles")
    b, _, h, w = x.shape
    cell_h, cell_w = h // grid, w // grid
    tile = max(1, int(min(cell_h, cell_w) * TILE_FRACTION)) if tile is None else int(tile)
    if not 1 <= tile <= min(cell_h, cell_w):
        raise SSLError(f"grid_tiles: a {tile} px tile does not fit the {cell_h}x{cell_w} px cells of a {grid}x{grid} "
                       f"grid on {h}x{w} images: use tile <= {min(cell_h, cell_w)} or larger images")
    g = cpu_generator(generator)
    n = grid * grid
    cells = torch.arange(n)
    top = (cells // grid) * cell_h + randint(cell_h - tile, (b, n), g)
    left = (cells % grid) * cell_w + randint(cell_w - tile, (b, n), g)
    image = torch.arange(b)[:, None].expand(b, n)
    return crop_patches(x, image, top, left, tile)


def normalize_tiles(tiles: Tensor, per_channel: bool = True) -> Tensor:
    """Each tile to mean 0 and standard deviation 1 on its own, against low-level statistics as a shortcut:
    each channel separately (``per_channel``), or with one mean and std over all its channels (the repo's
    ``tile.mean()``, ``tile.std()``). A constant tile or channel: std taken as 1."""
    dims = (-2, -1) if per_channel else (-3, -2, -1)
    mean = tiles.mean(dim=dims, keepdim=True)
    std = tiles.std(dim=dims, keepdim=True)
    std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
    return (tiles - mean) / std


def permute_tiles(tiles: Tensor, permutations: Tensor, labels: Tensor) -> Tensor:
    """Shuffle the tiles (B, n, ...) of image b by ``perm = permutations[labels[b]]``: position i shows tile
    ``perm[i]`` (the repo's ``data = [tiles[perm[t]] for t in range(9)]``)."""
    perm = permutations.to(tiles.device)[labels.to(tiles.device)]
    return tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], perm]


def unpermute_tiles(tiles: Tensor, permutations: Tensor, labels: Tensor) -> Tensor:
    """The inverse of :func:`permute_tiles`: tiles back in their cells' order."""
    inverse = permutations.to(tiles.device)[labels.to(tiles.device)].argsort(dim=1)
    return tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], inverse]


def jigsaw_tiles(x: Tensor, permutations: Tensor, grid: int = 3, tile: int | None = None,
                 generator: torch.Generator | None = None, normalize: bool = True,
                 per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Jigsaw inputs of a batch ``x`` (B, C, H, W): random tiles of the ``grid x grid`` cells (:func:`grid_tiles`),
    each normalised on its own (``normalize``; per channel or over all channels, :func:`normalize_tiles`),
    shuffled by a random permutation of the set per image.
    Returns ``tiles`` (B, grid^2, C, tile, tile) and ``labels`` (B,) long, the permutation indices.
    Colour jitter and grayscale (the paper's guards against chromatic aberration) belong to the views that
    make ``x``."""
    n = grid * grid
    if permutations.ndim != 2 or permutations.shape[1] != n:
        raise SSLError(f"jigsaw_tiles: permutations of shape {tuple(permutations.shape)} do not fit a {grid}x{grid} "
                       f"grid: pass maximal_hamming_permutations(num_tiles={n}, ...)")
    g = cpu_generator(generator)
    tiles = grid_tiles(x, grid, tile, g)
    labels = randint(permutations.shape[0] - 1, (x.shape[0],), g).to(x.device)
    if normalize:
        tiles = normalize_tiles(tiles, per_channel)
    return permute_tiles(tiles, permutations, labels), labels

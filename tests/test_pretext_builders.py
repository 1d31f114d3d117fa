"""The batched pretext-input builders obey their definitions: rotations, jigsaw permutation sets and tiles,
patch-pair geometry and shortcut guards, Lab colour and its in-gamut bins, masks and masking noise."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import skimage.color
import torch
import torch.nn.functional as F

from ssl_lightning.pretext import (ab_gamut_bins, bin_counts, central_mask, downsample_upsample, fill_with_mean,
                                   greedy_hamming, jigsaw_tiles, lab_inputs, lab_to_rgb, masking_noise,
                                   maximal_hamming_permutations, mean_hamming_distance, non_gray_mask, patch_pairs,
                                   permute_tiles, quantize_ab, random_region_mask, rebalance_weights, rgb_to_lab,
                                   rotate_batch, soft_encode, unpermute_tiles, unrotate_batch)
from ssl_lightning.pretext.jigsaw import all_permutations, grid_tiles
from ssl_lightning.registry import SSLError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coordinates(b: int, h: int, w: int) -> torch.Tensor:
    """Images whose pixels say where they are: channel 0 the row, 1 the column, 2 the image index."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([torch.stack([rows, cols, torch.full((h, w), float(i))]) for i in range(b)])


# ---- rotation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_rotation_batch_holds_every_image_four_times(device):
    x = torch.rand(5, 3, 8, 8, generator=_gen(0)).to(device)
    x4, labels = rotate_batch(x)
    assert x4.shape == (20, 3, 8, 8) and labels.device == x4.device
    assert torch.equal(labels.cpu(), torch.tensor([0, 1, 2, 3] * 5))
    back = unrotate_batch(x4, labels)
    for b in range(5):
        for k in range(4):
            assert torch.equal(back[4 * b + k], x[b])  # rotating back restores the image
    # label 1 is a quarter turn counter-clockwise: the top row becomes the left column, read bottom-up
    assert torch.equal(x4[1, :, :, 0], x[0, :, 0, :].flip(-1))
    assert torch.equal(x4[2], x[0].flip(-1).flip(-2))
    tiny = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert rotate_batch(tiny)[0][1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]


def test_rotation_needs_square_images():
    with pytest.raises(SSLError, match="square"):
        rotate_batch(torch.rand(2, 3, 8, 6))


# ---- jigsaw ------------------------------------------------------------------------------------------------
def test_all_permutations_in_lexicographic_order():
    assert torch.equal(all_permutations(6).long(), torch.tensor(list(itertools.permutations(range(6)))))
    p9 = all_permutations(9).long()
    codes = (p9 * 9 ** torch.arange(8, -1, -1)).sum(1)
    assert p9.shape == (math.factorial(9), 9) and bool((codes[1:] > codes[:-1]).all())  # distinct, increasing
    assert torch.equal(p9.sort(dim=1).values, torch.arange(9).expand(len(p9), 9))


def greedy_reference(perms: np.ndarray, first: int, num: int) -> tuple[list[int], list[float]]:
    """Algorithm 1 (Noroozi & Favaro, supplementary) as plainly as possible: the remaining candidates in their
    order, the mean Hamming distance of each to all chosen ones, the first of the largest."""
    chosen, means = [first], [0.0]
    remaining = [i for i in range(len(perms)) if i != first]
    for _ in range(num - 1):
        dist = [(perms[chosen] != perms[i]).sum(axis=1).mean() for i in remaining]
        best = int(np.argmax(dist))
        means.append(float(dist[best]))
        chosen.append(remaining.pop(best))
    return chosen, means


def test_greedy_hamming_is_algorithm_one():
    candidates = all_permutations(5)
    chosen, means = greedy_hamming(candidates, 30, _gen(4))
    ref_chosen, ref_means = greedy_reference(candidates.numpy().astype(int), int(chosen[0]), 30)
    assert chosen.tolist() == ref_chosen
    np.testing.assert_allclose(means.numpy(), ref_means, rtol=0, atol=1e-12)
    # what the greedy promised: the set's mean pairwise distance is the steps' means weighted by their counts
    perms = candidates[chosen].long()
    promised = sum(i * m for i, m in enumerate(means.tolist())) / math.comb(30, 2)
    assert abs(mean_hamming_distance(perms) - promised) < 1e-12


def test_maximal_hamming_permutations_beat_a_random_set():
    perms = maximal_hamming_permutations(9, 100, seed=0)
    assert perms.shape == (100, 9) and len({tuple(p) for p in perms.tolist()}) == 100
    assert torch.equal(perms, maximal_hamming_permutations(9, 100, seed=0))  # seeded
    assert not torch.equal(perms, maximal_hamming_permutations(9, 100, seed=1))
    _, means = greedy_hamming(all_permutations(9), 100, _gen(0))
    promised = sum(i * m for i, m in enumerate(means.tolist())) / math.comb(100, 2)
    assert abs(mean_hamming_distance(perms) - promised) < 1e-9
    random_set = all_permutations(9)[torch.randperm(math.factorial(9), generator=_gen(0))[:100]].long()
    # a random pair differs in 8 of 9 positions on average (one fixed point is expected)
    assert mean_hamming_distance(perms) > mean_hamming_distance(random_set) + 0.05
    assert mean_hamming_distance(perms) > 8.05


def test_jigsaw_permutation_applied_then_inverted_restores_the_tiles():
    x = torch.rand(6, 3, 30, 30, generator=_gen(1))
    perms = maximal_hamming_permutations(9, 24, seed=3)
    shuffled, labels = jigsaw_tiles(x, perms, generator=_gen(7), normalize=False)
    tiles = grid_tiles(x, generator=_gen(7))  # the same draws: tile offsets first
    assert shuffled.shape == (6, 9, 3, 8, 8) and labels.shape == (6,)
    assert torch.equal(unpermute_tiles(shuffled, perms, labels), tiles)
    assert torch.equal(permute_tiles(tiles, perms, labels), shuffled)
    assert not torch.equal(shuffled, tiles)


@pytest.mark.parametrize("device", DEVICES)
def test_jigsaw_tiles_come_from_their_cells(device):
    """Position i of image b shows a tile cropped inside cell perms[labels[b]][i], at a random offset."""
    b, side, grid, tile = 40, 36, 3, 9  # 12 px cells
    x = _coordinates(b, side, side).to(device)
    perms = maximal_hamming_permutations(9, 10, seed=0)
    shuffled, labels = jigsaw_tiles(x, perms, grid, tile, generator=_gen(2), normalize=False)
    assert shuffled.device == x.device and labels.device == x.device
    shuffled, labels = shuffled.cpu(), labels.cpu()
    offsets = set()
    for img in range(b):
        for pos in range(9):
            cell = int(perms[labels[img], pos])
            t = shuffled[img, pos]
            top, left = int(t[0, 0, 0]), int(t[1, 0, 0])
            assert torch.equal(t[0], top + torch.arange(tile, dtype=torch.float32)[:, None].expand(tile, tile))
            assert torch.equal(t[1], left + torch.arange(tile, dtype=torch.float32)[None, :].expand(tile, tile))
            assert (t[2] == img).all()
            r, c = cell // 3 * 12, cell % 3 * 12
            assert r <= top <= r + 12 - tile and c <= left <= c + 12 - tile
            offsets.add((top - r, left - c))
    assert len(offsets) == 16  # every offset in 0..3 x 0..3 occurs: the tile position is jittered
    assert set(labels.tolist()) == set(range(10))


def test_jigsaw_tiles_are_normalised_per_channel():
    x = torch.rand(3, 3, 30, 30, generator=_gen(5)) * 0.3 + 0.5
    x[0, 1] = 0.25  # a constant channel: no division by a zero std
    tiles, _ = jigsaw_tiles(x, maximal_hamming_permutations(9, 5), generator=_gen(0))
    assert torch.isfinite(tiles).all()
    mean, std = tiles.mean(dim=(-2, -1)), tiles.std(dim=(-2, -1))
    assert mean.abs().max() < 1e-5
    assert (std[1:] - 1).abs().max() < 1e-5 and (tiles[0, :, 1] == 0).all()
    whole, _ = jigsaw_tiles(x, maximal_hamming_permutations(9, 5), generator=_gen(0), per_channel=False)
    assert whole.mean(dim=(-3, -2, -1)).abs().max() < 1e-5 and (whole.std(dim=(-3, -2, -1)) - 1).abs().max() < 1e-5
    assert whole.mean(dim=(-2, -1)).abs().max() > 0.1  # one mean for all channels: each keeps its offset


def test_jigsaw_rejects_bad_sizes():
    with pytest.raises(SSLError, match="does not fit"):
        grid_tiles(torch.rand(1, 3, 12, 12), grid=3, tile=5)
    with pytest.raises(SSLError, match="num_tiles=9"):
        jigsaw_tiles(torch.rand(1, 3, 30, 30), maximal_hamming_permutations(4, 3))


# ---- context prediction ------------------------------------------------------------------------------------
POS2LBL = {(-1, -1): 0, (-1, 0): 1, (-1, 1): 2, (0, -1): 3, (0, 1): 4, (1, -1): 5, (1, 0): 6, (1, 1): 7}  # (row, col)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_pair_labels_match_the_geometry(device):
    b, side, patch, gap, jitter = 400, 48, 8, 4, 2
    x = _coordinates(b, side, side).to(device)
    first, second, labels = patch_pairs(x, patch, gap, jitter, _gen(3), chromatic=False, downsample=0, normalize=False)
    assert first.shape == second.shape == (b, 3, patch, patch) and labels.device == x.device
    first, second, labels = first.cpu(), second.cpu(), labels.cpu()
    deviations = set()
    for i in range(b):
        assert (first[i, 2] == i).all() and (second[i, 2] == i).all()  # both from image i
        t1, l1 = int(first[i, 0, 0, 0]), int(first[i, 1, 0, 0])
        t2, l2 = int(second[i, 0, 0, 0]), int(second[i, 1, 0, 0])
        assert torch.equal(second[i, 0], t2 + torch.arange(patch, dtype=torch.float32)[:, None].expand(patch, patch))
        step = patch + gap
        # the grid step in the labelled direction, up to the two patches' jitter
        direction = [d for d in POS2LBL if POS2LBL[d] == int(labels[i])][0]
        dy, dx = t2 - t1 - direction[0] * step, l2 - l1 - direction[1] * step
        assert abs(dy) <= 2 * jitter and abs(dx) <= 2 * jitter
        deviations.add(dy)
        # and no other label's geometry fits as well: the label is recoverable from the positions
        assert POS2LBL[(round((t2 - t1) / step), round((l2 - l1) / step))] == int(labels[i])
    assert deviations == set(range(-2 * jitter, 2 * jitter + 1))
    assert set(labels.tolist()) == set(range(8))


def test_patch_pairs_need_room():
    with pytest.raises(SSLError, match="at least 28x28"):
        patch_pairs(torch.rand(2, 3, 24, 24), patch=8, gap=8, jitter=2)


def test_downsample_upsample_matches_interpolate_per_patch():
    x = torch.rand(6, 3, 32, 32, generator=_gen(8))
    sizes = torch.tensor([10, 17, 31, 10, 25, 32])
    out = downsample_upsample(x, sizes)
    for i, s in enumerate(sizes.tolist()):
        small = F.interpolate(x[i:i + 1], size=(s, s), mode="bilinear", align_corners=False)
        ref = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)


def test_patch_pairs_shortcut_guards():
    x = torch.rand(300, 3, 40, 40, generator=_gen(9))
    kw = dict(patch=12, gap=6, jitter=2)
    plain, plain2, _ = patch_pairs(x, **kw, generator=_gen(1), chromatic=False, downsample=0, normalize=False)
    # a third of the patches downsampled: the others are the plain crops (the positions are drawn first)
    down, down2, _ = patch_pairs(x, **kw, generator=_gen(1), chromatic=False, normalize=False)
    changed = torch.cat([(down != plain).flatten(1).any(1), (down2 != plain2).flatten(1).any(1)]).float().mean()
    assert 0.25 < changed < 0.42
    # chromatic aberration: one channel kept as it was, the two others tiny noise
    kept, kept2, _ = patch_pairs(x, **kw, generator=_gen(1), downsample=0, normalize=False)
    same = (kept == plain).flatten(2).all(-1)  # (B, C)
    assert bool((same.sum(1) == 1).all())
    assert (kept[~same].abs() <= 0.5 / 255).all()
    assert torch.bincount(same.float().argmax(1), minlength=3).min() > 60  # each channel kept about 1/3 of the time
    # normalisation: mean-free channels, unit RMS per patch
    normed, _, _ = patch_pairs(x, **kw, generator=_gen(1))
    assert normed.mean(dim=(-2, -1)).abs().max() < 1e-5
    assert (normed.pow(2).mean(dim=(1, 2, 3)) - 1).abs().max() < 1e-4
    # reproducible; grey input keeps its only channel
    assert torch.equal(normed, patch_pairs(x, **kw, generator=_gen(1))[0])
    grey, _, _ = patch_pairs(x[:, :1], **kw, generator=_gen(1), downsample=0, normalize=False)
    assert torch.equal(grey, plain[:, :1])


# ---- colour ------------------------------------------------------------------------------------------------
def test_lab_matches_scikit_image_and_round_trips():
    x = torch.rand(2, 3, 16, 16, generator=_gen(0), dtype=torch.float64)
    x[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0])
    x[0, :, 0, 1] = torch.tensor([1.0, 1.0, 1.0])
    lab = rgb_to_lab(x)
    ref = torch.from_numpy(skimage.color.rgb2lab(x.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    torch.testing.assert_close(lab, ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(lab_to_rgb(lab), x, atol=1e-8, rtol=0)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x.float())), x.float(), atol=1e-4, rtol=0)
    l_in, ab = lab_inputs(x)
    assert l_in.shape == (2, 1, 16, 16) and ab.shape == (2, 2, 16, 16)
    torch.testing.assert_close(l_in, (ref[:, :1] - 50) / 100, atol=1e-8, rtol=0)
    assert abs(l_in[0, 0, 0, 0] + 0.5) < 1e-6 and abs(l_in[0, 0, 0, 1] - 0.5) < 1e-6  # black, white


def _cells(ab: np.ndarray) -> set[tuple[int, int]]:
    return {tuple(c) for c in (np.round(ab / 10) * 10).astype(int).reshape(-1, 2).tolist()}


def test_ab_gamut_bins_are_the_cells_of_srgb_colours():
    bins = ab_gamut_bins()
    assert bins.shape == (261, 2) and bool((bins % 10 == 0).all())
    keys = [tuple(b) for b in bins.long().tolist()]
    assert keys == sorted(keys)
    # complete: random 8-bit colours (inside the cube too) all quantise into the set (scikit-image's Lab)
    rgb = torch.randint(0, 256, (50_000, 3), generator=_gen(0)).double().numpy() / 255
    assert _cells(skimage.color.rgb2lab(rgb[None])[0, :, 1:]) <= set(keys)
    # in gamut: every bin holds an 8-bit colour; decoding it (its L, a, b) gives an RGB inside [0, 1]
    v = np.arange(256) / 255
    u, w = (t.ravel() for t in np.meshgrid(v, v, indexing="ij"))
    faces = np.concatenate([np.stack(np.insert(np.stack([u, w]), k, np.full_like(u, f), axis=0), 1)
                            for k in range(3) for f in (0.0, 1.0)])
    lab = skimage.color.rgb2lab(faces[None])[0]
    def key(ab: np.ndarray) -> np.ndarray:  # a cell's number
        return (np.round(ab[:, 0] / 10).astype(int) + 50) * 100 + np.round(ab[:, 1] / 10).astype(int)

    bin_keys = key(bins.numpy())
    near = np.searchsorted(bin_keys, key(lab[:, 1:]))  # the bin each colour rounds to
    assert np.array_equal(bin_keys[near], key(lab[:, 1:]))
    depth = 5 - np.abs(lab[:, 1:] - bins.numpy()[near]).max(1)  # how far inside its bin's cell a colour lies
    order = np.lexsort((-depth, near))  # by bin, the deepest colour first
    held, first = np.unique(near[order], return_index=True)
    assert held.tolist() == list(range(len(bins)))  # no bin without an sRGB colour
    witness = lab[order[first]]  # per bin, its most central 8-bit colour
    assert np.all(np.abs(witness[:, 1:] - bins.numpy()) <= 5)
    back = skimage.color.lab2rgb(witness[None])[0]
    assert np.all(back >= -1e-9) and np.all(back <= 1 + 1e-9)


def test_ab_gamut_bins_neighbours_cover_every_colour():
    nearest, neighbours = ab_gamut_bins(), ab_gamut_bins(cover="neighbours")
    assert neighbours.shape == (309, 2)
    big = {tuple(b) for b in neighbours.long().tolist()}
    assert {tuple(b) for b in nearest.long().tolist()} <= big
    rgb = torch.randint(0, 256, (50_000, 3), generator=_gen(1)).double().numpy() / 255
    ab = skimage.color.rgb2lab(rgb[None])[0, :, 1:] / 10
    key = lambda cells: (cells[:, 0] + 50) * 100 + cells[:, 1]  # noqa: E731
    big_keys = key(neighbours.numpy() / 10).astype(int)
    for da in (0, 1):
        for db in (0, 1):  # the 4 grid points around every colour are bins
            corners = (np.floor(ab) + [da, db]).astype(int)
            assert np.isin(key(corners), big_keys).all()


def test_soft_encoding():
    bins = ab_gamut_bins()
    _, ab = lab_inputs(torch.rand(2, 3, 6, 6, generator=_gen(3)))
    target = soft_encode(ab, bins, nn=10, sigma=5.0)
    assert target.shape == (2, 261, 6, 6)
    torch.testing.assert_close(target.sum(1), torch.ones(2, 6, 6), atol=1e-6, rtol=0)
    assert bool(((target > 0).sum(1) == 10).all())
    assert torch.equal(target.argmax(1), quantize_ab(ab, bins))
    for b, i, j in [(0, 0, 0), (1, 3, 5), (0, 5, 2)]:  # per pixel, as the official NNEncode
        point = ab[b, :, i, j].double()
        d2 = ((bins.double() - point) ** 2).sum(1)
        order = d2.argsort()[:10]
        weights = torch.exp(-d2[order] / (2 * 5.0 ** 2))
        expected = torch.zeros(261, dtype=torch.float64)
        expected[order] = weights / weights.sum()
        torch.testing.assert_close(target[b, :, i, j].double(), expected, atol=1e-5, rtol=0)


def test_rebalance_weights():
    prior = torch.rand(313, generator=_gen(4)) ** 4
    p = prior / prior.sum()
    w = rebalance_weights(prior, lam=0.5)
    assert abs((p * w).sum().item() - 1) < 1e-5  # E_p[w] = 1
    expected = 1 / (0.5 * p + 0.5 / 313)
    torch.testing.assert_close(w, expected / (p * expected).sum())
    assert w[p.argmin()] > 1 > w[p.argmax()]  # rare colours weigh more
    torch.testing.assert_close(rebalance_weights(torch.ones(50)), torch.ones(50))
    torch.testing.assert_close(rebalance_weights(prior, lam=1.0), torch.ones(313))
    counts = bin_counts(lab_inputs(torch.rand(2, 3, 5, 5, generator=_gen(5)))[1], ab_gamut_bins())
    assert counts.sum() == 50 and counts.shape == (261,)
    with pytest.raises(SSLError, match="non-negative"):
        rebalance_weights(-prior)


def test_non_gray_mask():
    grey = torch.rand(1, 1, 8, 8, generator=_gen(6)).expand(1, 3, 8, 8)
    colour = torch.rand(1, 3, 8, 8, generator=_gen(6))
    _, ab = lab_inputs(torch.cat([grey, colour]))
    assert non_gray_mask(ab).tolist() == [False, True]


# ---- masks and noise ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,hole", [(128, 64), (32, 16), (33, 16), (10, 10)])
def test_central_mask_covers_hole_squared(size, hole):
    mask = central_mask(size, hole)
    assert mask.sum().item() == hole * hole
    rows, cols = mask.nonzero().T
    assert rows.min() == cols.min() == (size - hole) // 2 and rows.max() - rows.min() == hole - 1
    if (size - hole) % 2 == 0:
        assert torch.equal(mask, mask.flip(0)) and torch.equal(mask, mask.flip(1))  # centred


@pytest.mark.parametrize("size", [32, 128])
def test_random_region_mask_covers_20_to_30_percent(size):
    masks = [random_region_mask(size, _gen(seed)) for seed in range(6)]
    for m in masks:
        assert m.shape == (size, size) and m.dtype == torch.bool
        assert 0.2 < m.float().mean() < 0.3
        # regions, not salt-and-pepper: neighbouring pixels mostly agree (0.625 for independent pixels)
        assert (m[:, 1:] == m[:, :-1]).float().mean() > 0.85
    assert torch.equal(masks[0], random_region_mask(size, _gen(0)))
    assert not torch.equal(masks[0], masks[1])
    with pytest.raises(SSLError, match="widen coverage"):
        random_region_mask(size, _gen(0), coverage=(0.9, 0.95), max_tries=64)


def test_fill_with_mean():
    x = torch.rand(2, 3, 16, 16, generator=_gen(7))
    mask = central_mask(16, 8)
    out = fill_with_mean(x, mask, (0.4, 0.5, 0.6))
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert torch.equal(out[:, :, mask], torch.tensor([0.4, 0.5, 0.6])[None, :, None].expand(2, 3, 64))
    per_image = torch.stack([mask, ~mask])  # (B, H, W)
    out2 = fill_with_mean(x, per_image, torch.tensor([0.0, 0.0, 0.0]))
    assert (out2[0][:, mask] == 0).all() and (out2[1][:, ~mask] == 0).all()
    assert torch.equal(out2[1][:, mask], x[1][:, mask])
    with pytest.raises(SSLError, match="one mean per channel"):
        fill_with_mean(x, mask, (0.5,))


def test_masking_noise_zeroes_the_stated_fraction():
    x = torch.rand(4, 3, 10, 10, generator=_gen(8)) + 0.1  # no zeros of its own
    g = _gen(0)
    first, second = masking_noise(x, 0.25, g), masking_noise(x, 0.25, g)
    for y in (first, second):
        zeros = (y == 0).reshape(4, -1).sum(1)
        assert zeros.tolist() == [75] * 4  # round(0.25 * 300) per sample
        assert torch.equal(y[y != 0], x[y != 0])  # the others untouched
    assert not torch.equal(first, second)  # resampled at every call
    assert torch.equal(first, masking_noise(x, 0.25, _gen(0)))  # reproducible
    assert torch.equal(masking_noise(x, 0.0, g), x)
    assert ((masking_noise(x, 0.8, g) == 0).reshape(4, -1).sum(1) == 240).all()  # above one half too
    hits = sum((masking_noise(x, 0.25, g) == 0).float() for _ in range(40))
    assert (hits > 0).all()  # every input gets zeroed some time: the chosen subset is random
    with pytest.raises(SSLError, match="fraction"):
        masking_noise(x, 1.5)


# ---- chance level ------------------------------------------------------------------------------------------
def test_uniform_guesses_score_chance_level():
    """Cross-entropy of uniform logits on each task's targets: ln 4, ln 8, ln P and ln Q (Q = 261 bins here;
    ln 313 with the official bin file)."""
    x = torch.rand(4, 3, 36, 36, generator=_gen(9))
    _, rot = rotate_batch(x)
    assert abs(F.cross_entropy(torch.zeros(len(rot), 4), rot).item() - math.log(4)) < 1e-6
    _, _, ctx = patch_pairs(x, 8, 4, 1, _gen(0))
    assert abs(F.cross_entropy(torch.zeros(len(ctx), 8), ctx).item() - math.log(8)) < 1e-6
    perms = maximal_hamming_permutations(9, 64)
    _, jig = jigsaw_tiles(x, perms, generator=_gen(0))
    assert abs(F.cross_entropy(torch.zeros(len(jig), len(perms)), jig).item() - math.log(64)) < 1e-6
    _, ab = lab_inputs(x)
    target = soft_encode(ab, ab_gamut_bins())
    soft_ce = -(target * torch.log_softmax(torch.zeros_like(target), dim=1)).sum(1).mean()
    assert abs(soft_ce.item() - math.log(261)) < 1e-5

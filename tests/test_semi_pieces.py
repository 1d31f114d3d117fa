"""The shared semi-supervised pieces (ssl_lightning.semi), each against a plain transcription of its formula
written here independently (loops over samples and classes), on random inputs; USB's ``semilearn`` serves
as a second reference where its conventions match, loaded file by file without its heavy package import
(skipped when semilearn is not importable: ``pip install --no-deps semilearn==0.3.2``, or its unzipped wheel
on PYTHONPATH)."""
from __future__ import annotations

import importlib.util
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from ssl_lightning.semi import (TemporalEnsemble, confidence_mask, cosine_rampdown, deinterleave, entropy,
                                fixmatch_lr_factor, hard_pseudo_labels, interleave, interleave_offsets,
                                kl_consistency, linear_rampup, masked_cross_entropy, mean_teacher_momentum, mix,
                                mixup, pi_model_weight, pseudo_label, sample_lambda, sharpen, sigmoid_rampup,
                                softmax_mse, tempens_rampdown)

B, C = 12, 7


def random_logits(seed: int = 0, b: int = B, c: int = C, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    out = []
    for row in logits.tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        out.append([v / sum(e) for v in e])
    return out


# ---- ramps ----------------------------------------------------------------------------------------------
def test_sigmoid_linear_cosine_ramps():
    for current in [-3.0, 0.0, 7.3, 40.0, 79.9, 80.0, 120.0]:
        t = min(max(current, 0.0), 80.0) / 80.0
        assert sigmoid_rampup(current, 80) == pytest.approx(math.exp(-5 * (1 - t) ** 2), rel=1e-12)
        assert linear_rampup(current, 80) == pytest.approx(t, rel=1e-12)
        assert cosine_rampdown(current, 80) == pytest.approx((math.cos(math.pi * t) + 1) / 2, abs=1e-12)
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 0) == linear_rampup(5, 0) == 1.0


def test_pi_model_weight_is_zero_in_the_first_epoch_and_scaled():
    assert pi_model_weight(0, 100.0) == 0.0
    for epoch in [1, 10, 40, 80, 200]:
        t = min(epoch, 80) / 80
        want = 100.0 * 4000 / 50000 * math.exp(-5 * (1 - t) ** 2)
        assert pi_model_weight(epoch, 100.0, 80, num_labelled=4000, num_samples=50000) == pytest.approx(want)
    assert pi_model_weight(80, 30.0) == pytest.approx(30.0)


def test_tempens_rampdown():
    assert tempens_rampdown(249, 300, 50) == 1.0
    for epoch in [250, 260, 299]:
        e = (epoch - 250) * 0.5
        assert tempens_rampdown(epoch, 300, 50) == pytest.approx(math.exp(-e * e / 50))


def test_fixmatch_lr_and_mean_teacher_momentum():
    assert fixmatch_lr_factor(0, 1000) == 1.0
    assert fixmatch_lr_factor(1000, 1000) == pytest.approx(math.cos(7 * math.pi / 16))
    assert fixmatch_lr_factor(1000, 1000) == pytest.approx(0.1951, abs=1e-4)  # ends at ~0.2, not 0
    assert fixmatch_lr_factor(5000, 1000) == fixmatch_lr_factor(1000, 1000)
    assert fixmatch_lr_factor(437, 1000) == pytest.approx(math.cos(7 * math.pi * 437 / (16 * 1000)))
    assert mean_teacher_momentum(0, 0.99) == 0.0
    assert mean_teacher_momentum(9, 0.99) == pytest.approx(0.9)
    assert mean_teacher_momentum(10_000, 0.99) == 0.99


# ---- masks, pseudo-labels, sharpening ---------------------------------------------------------------------
def test_confidence_mask_and_pseudo_labels():
    logits = random_logits(1)
    probs = torch.softmax(logits, dim=1)
    rows = softmax_rows(logits)
    for tau in [0.3, 0.6, 0.95]:
        want = [1.0 if max(r) >= tau else 0.0 for r in rows]
        assert confidence_mask(probs, tau).tolist() == want
    exact = torch.tensor([[0.5, 0.25, 0.25], [0.75, 0.125, 0.125]])
    assert confidence_mask(exact, 0.5).tolist() == [1.0, 1.0]  # FixMatch: max p >= tau
    assert confidence_mask(exact, 0.5, strict=True).tolist() == [0.0, 1.0]  # Pseudo-label baseline: >
    labels, mask, p = pseudo_label(logits.requires_grad_(), 0.6)
    assert labels.tolist() == [max(range(C), key=lambda c: r[c]) for r in rows]
    assert torch.equal(labels, hard_pseudo_labels(probs))
    assert not p.requires_grad and not mask.requires_grad
    torch.testing.assert_close(p, probs.detach())


def test_sharpen():
    p = torch.softmax(random_logits(2, scale=1.0), dim=1)
    for T in [1.0, 0.5, 0.25]:
        want = [[v ** (1 / T) / sum(u ** (1 / T) for u in row) for v in row] for row in p.tolist()]
        torch.testing.assert_close(sharpen(p, T), torch.tensor(want, dtype=p.dtype))
    torch.testing.assert_close(sharpen(p, 1.0), p)  # T = 1: the identity
    cold = sharpen(p, 1e-3)
    assert torch.isfinite(cold).all()
    torch.testing.assert_close(cold, torch.nn.functional.one_hot(p.argmax(1), C).to(p.dtype), atol=1e-6, rtol=0)
    tiny = sharpen(torch.tensor([[0.5, 0.3, 0.2]]), 1e-6)  # p^(1e6) underflows; the log form does not
    assert tiny.tolist() == [[1.0, 0.0, 0.0]]


# ---- MixUp --------------------------------------------------------------------------------------------------
def test_mixup_per_example_definition():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    y = torch.softmax(torch.randn(10, C, dtype=torch.float64), dim=1)
    out = mixup(x, y, alpha=0.75)
    lam, perm = out.lam.tolist(), out.perm.tolist()
    assert sorted(perm) == list(range(10))  # partners: a shuffle of the batch itself
    assert all(0.5 <= v <= 1.0 for v in lam)  # lambda' = max(lambda, 1 - lambda)
    assert len(set(lam)) == 10  # one lambda per example
    for i in range(10):
        j, l = perm[i], lam[i]
        torch.testing.assert_close(out.inputs[i], l * x[i] + (1 - l) * x[j])
        torch.testing.assert_close(out.targets[i], l * y[i] + (1 - l) * y[j])
    torch.testing.assert_close(out.targets.sum(1), torch.ones(10, dtype=torch.float64))  # still distributions


def test_mixup_lambda_law_batch_lambda_and_no_mixing():
    torch.manual_seed(1)
    lam = sample_lambda(40_000, alpha=1.0)  # Beta(1, 1) = U(0, 1), so max(l, 1 - l) ~ U(0.5, 1)
    assert float(lam.min()) >= 0.5 and float(lam.mean()) == pytest.approx(0.75, abs=0.005)
    assert float((lam < 0.625).float().mean()) == pytest.approx(0.25, abs=0.01)
    raw = sample_lambda(40_000, alpha=1.0, keep_larger=False)
    assert float(raw.min()) < 0.01 and float(raw.mean()) == pytest.approx(0.5, abs=0.01)
    one = sample_lambda(8, alpha=0.5, per_example=False)  # USB's convention: one lambda per batch
    assert len(set(one.tolist())) == 1 and float(one[0]) >= 0.5
    x, y = torch.randn(6, 5), torch.eye(6)
    out = mixup(x, y, alpha=0.0)  # alpha <= 0: no mixing (as the official code)
    assert torch.equal(out.inputs, x) and torch.equal(out.targets, y)
    mixed_x, mixed_y = mix(x, y, torch.tensor(0.7), torch.tensor([1, 0, 3, 2, 5, 4]))
    torch.testing.assert_close(mixed_x[0], 0.7 * x[0] + 0.3 * x[1])
    torch.testing.assert_close(mixed_y[5], 0.7 * y[5] + 0.3 * y[4])


# ---- interleave -------------------------------------------------------------------------------------------
def tagged_batches(k: int, b: int) -> list[torch.Tensor]:
    """k + 1 batches of b rows; row r of batch s is [s, r, random...] so every row knows where it came from."""
    g = torch.Generator().manual_seed(k * 100 + b)
    return [torch.cat([torch.full((b, 1), float(s)), torch.arange(b, dtype=torch.float32)[:, None],
                       torch.randn(b, 3, generator=g)], dim=1) for s in range(k + 1)]


def test_interleave_offsets():
    assert interleave_offsets(10, 3) == [0, 3, 6, 10]  # the larger slices last
    assert interleave_offsets(64, 3) == [0, 21, 42, 64]
    assert interleave_offsets(11, 3) == [0, 3, 7, 11]
    assert interleave_offsets(9, 3) == [0, 3, 6, 9]


@pytest.mark.parametrize("k,b", [(2, 10), (2, 64), (1, 7), (3, 5)])
def test_interleave_swaps_slices_and_inverts(k, b):
    batches = tagged_batches(k, b)
    mixed = interleave(batches)
    assert [m.shape for m in mixed] == [x.shape for x in batches]
    # the first batch (the one whose BatchNorm statistics are kept) holds samples of every source
    assert set(mixed[0][:, 0].long().tolist()) == set(range(k + 1))
    # a plain transcription: slice i of batch 0 and of batch i are exchanged
    off = interleave_offsets(b, k + 1)
    for s in range(k + 1):
        for p in range(k + 1):
            src = p if (s == 0 and p > 0) else (0 if (p == s and s > 0) else s)
            assert torch.equal(mixed[s][off[p]:off[p + 1]], batches[src][off[p]:off[p + 1]]), (s, p)
    # nothing lost or duplicated, and de-interleaving restores every batch exactly
    assert sorted(map(tuple, torch.cat(mixed)[:, :2].tolist())) == sorted(map(tuple, torch.cat(batches)[:, :2].tolist()))
    back = deinterleave(mixed)
    assert all(torch.equal(a, c) for a, c in zip(back, batches))


def test_interleave_refuses_unequal_batches():
    with pytest.raises(ValueError, match="equal size"):
        interleave([torch.zeros(4, 2), torch.zeros(5, 2)])


# ---- unlabelled losses ----------------------------------------------------------------------------------------
def test_softmax_mse_is_averaged_over_classes_and_samples():
    logits, target = random_logits(3), torch.softmax(random_logits(4), dim=1)
    p = softmax_rows(logits)
    want = sum((p[b][c] - float(target[b, c])) ** 2 for b in range(B) for c in range(C)) / (B * C)
    assert float(softmax_mse(logits, target)) == pytest.approx(want, rel=1e-12)


def test_kl_consistency_is_summed_over_classes_averaged_over_batch():
    logits, target_logits = random_logits(5), random_logits(6)
    p, q = softmax_rows(logits), softmax_rows(target_logits)
    want = sum(q[b][c] * math.log(q[b][c] / p[b][c]) for b in range(B) for c in range(C)) / B
    assert float(kl_consistency(logits, target_logits)) == pytest.approx(want, rel=1e-10)
    assert float(kl_consistency(logits, logits)) == pytest.approx(0.0, abs=1e-12)


def test_entropy():
    logits = random_logits(7)
    p = softmax_rows(logits)
    want = -sum(p[b][c] * math.log(p[b][c]) for b in range(B) for c in range(C)) / B
    assert float(entropy(logits)) == pytest.approx(want, rel=1e-12)


def test_masked_cross_entropy_counts_masked_samples_in_the_denominator():
    logits = random_logits(8)
    labels = torch.randint(C, (B,), generator=torch.Generator().manual_seed(8))
    mask = (torch.arange(B) % 3 == 0).double()
    p = softmax_rows(logits)
    want = sum(-math.log(p[b][int(labels[b])]) * float(mask[b]) for b in range(B)) / B  # / B, not / mask.sum()
    assert float(masked_cross_entropy(logits, labels, mask)) == pytest.approx(want, rel=1e-12)
    soft = torch.softmax(random_logits(9), dim=1)
    want_soft = sum(-float(soft[b, c]) * math.log(p[b][c]) for b in range(B) for c in range(C)) / B
    assert float(masked_cross_entropy(logits, soft)) == pytest.approx(want_soft, rel=1e-12)
    assert float(masked_cross_entropy(logits, labels, torch.zeros(B, dtype=torch.float64))) == 0.0


# ---- semilearn (USB) as a second reference -------------------------------------------------------------------
def _semilearn_root() -> Path | None:
    spec = importlib.util.find_spec("semilearn")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def usb():
    """semilearn's ``core/criterions`` package and ``algorithms/utils/ops.py``, loaded by path: they import
    only torch and numpy (semilearn's own __init__ pulls in timm, transformers, torchaudio...)."""
    root = _semilearn_root()
    if root is None:
        pytest.skip("semilearn is not importable (pip install --no-deps semilearn==0.3.2, or its unzipped wheel "
                    "on PYTHONPATH): the USB reference checks are skipped")
    folder = root / "core" / "criterions"
    spec = importlib.util.spec_from_file_location("_usb_criterions", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    criterions = importlib.util.module_from_spec(spec)
    sys.modules["_usb_criterions"] = criterions
    spec.loader.exec_module(criterions)
    spec = importlib.util.spec_from_file_location("_usb_ops", root / "algorithms" / "utils" / "ops.py")
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    return criterions, ops


def test_against_semilearn_consistency_loss(usb):
    criterions, _ = usb
    logits = random_logits(10)
    labels = torch.randint(C, (B,), generator=torch.Generator().manual_seed(10))
    mask = (torch.rand(B, generator=torch.Generator().manual_seed(11)) > 0.5).double()
    torch.testing.assert_close(masked_cross_entropy(logits, labels, mask),
                               criterions.consistency_loss(logits, labels, "ce", mask))
    soft = torch.softmax(random_logits(12), dim=1)
    torch.testing.assert_close(softmax_mse(logits, soft), criterions.consistency_loss(logits, soft, "mse"))
    torch.testing.assert_close(masked_cross_entropy(logits, soft), criterions.consistency_loss(logits, soft, "ce"))


def test_against_semilearn_mixup_one_target_and_interleave(usb):
    _, ops = usb
    n = 9
    x, y = torch.eye(n, dtype=torch.float64), torch.softmax(random_logits(13, b=n), dim=1)
    mixed_x, mixed_y, lam = ops.mixup_one_target(x, y, alpha=0.5, is_bias=True)
    assert lam >= 0.5
    # recover semilearn's partners from the identity inputs: row i is lam e_i + (1 - lam) e_perm[i]
    off = mixed_x - lam * x
    perm = torch.tensor([int(off[i].argmax()) if off[i].max() > 1e-12 else i for i in range(n)])
    ours_x, ours_y = mix(x, y, torch.tensor(lam, dtype=torch.float64), perm)
    torch.testing.assert_close(ours_x, mixed_x)
    torch.testing.assert_close(ours_y, mixed_y)
    for k, b in [(2, 10), (2, 64), (3, 5)]:
        batches = tagged_batches(k, b)
        assert all(torch.equal(a, c) for a, c in zip(interleave(batches), ops.interleave(batches, b)))


# ---- temporal ensemble ------------------------------------------------------------------------------------------
def test_ensemble_of_a_constant_prediction_is_that_prediction():
    n = 6
    z = torch.softmax(torch.randn(n, C, generator=torch.Generator().manual_seed(14)), dim=1)
    ens = TemporalEnsemble(n, C, decay=0.6)
    assert torch.equal(ens.targets(torch.arange(n)), torch.zeros(n, C))  # targets start at 0
    for t in range(1, 6):
        for rows in (torch.tensor([4, 0, 2]), torch.tensor([1, 5, 3])):  # every sample once per epoch
            ens.record(rows, z[rows])
        ens.end_epoch()
        assert int(ens.epochs_done) == t
        torch.testing.assert_close(ens.targets(torch.arange(n)), z)  # Z / (1 - 0.6^t) = z
        torch.testing.assert_close(ens.ensemble, (1 - 0.6 ** t) * z)


def test_ensemble_update_formula_unseen_and_duplicates():
    n = 5
    g = torch.Generator().manual_seed(15)
    ens = TemporalEnsemble(n, C, decay=0.6)
    Z, t = [[0.0] * C for _ in range(n)], [0] * n
    for epoch in range(4):
        seen = [0, 1, 2, 3, 4] if epoch != 2 else [0, 3]  # samples 1, 2, 4 are not seen in epoch 2
        z = torch.rand(len(seen), C, generator=g)
        ens.record(torch.tensor(seen), z)
        for j, i in enumerate(seen):
            Z[i] = [0.6 * a + 0.4 * float(b) for a, b in zip(Z[i], z[j])]
            t[i] += 1
        ens.end_epoch()
    want = torch.tensor([[v / (1 - 0.6 ** t[i]) for v in Z[i]] for i in range(n)])
    torch.testing.assert_close(ens.targets(torch.arange(n)), want)
    assert ens.updates.tolist() == t == [4, 3, 3, 4, 3]
    # one sample twice in a step (or in an epoch): the last prediction is the one folded in
    dup = TemporalEnsemble(2, C)
    first, last = torch.rand(1, C, generator=g), torch.rand(1, C, generator=g)
    dup.record(torch.tensor([1, 0, 1]), torch.cat([first, torch.zeros(1, C), last]))
    dup.end_epoch()
    torch.testing.assert_close(dup.targets(torch.tensor([1])), last)


def test_ensemble_checkpoint_round_trip():
    g = torch.Generator().manual_seed(16)
    ens = TemporalEnsemble(8, C)
    for _ in range(2):
        ens.record(torch.arange(8), torch.rand(8, C, generator=g))
        ens.end_epoch()
    ens.record(torch.tensor([3, 5]), torch.rand(2, C, generator=g))  # mid-epoch state is saved too
    assert set(ens.state_dict()) == {"ensemble", "epoch_predictions", "seen", "updates", "epochs_done"}
    buffer = io.BytesIO()
    torch.save({"model": ens.state_dict()}, buffer)
    buffer.seek(0)
    restored = TemporalEnsemble(8, C)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["model"])
    z = torch.rand(8, C, generator=g)  # training goes on identically from the restored state
    for m in (ens, restored):
        m.record(torch.arange(8), z)
        m.end_epoch()
    torch.testing.assert_close(ens.targets(torch.arange(8)), restored.targets(torch.arange(8)), rtol=0, atol=0)
    assert torch.equal(ens.updates, restored.updates) and int(ens.epochs_done) == int(restored.epochs_done) == 3


# The ensemble under 2-process DDP (rows of every process written in rank order) is checked in test_ddp.py,
# whose scenarios share one spawn of 2 processes.

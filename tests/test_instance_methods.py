"""Instance methods and their per-image state: NPID (memory bank, NCE and exact softmax, frozen Z) and Noise As
Targets (fixed targets, per-batch Hungarian assignment). Losses against loop transcriptions of the papers'
formulas, the sheet's invariants, and exact resume; the 2-process checks are in test_ddp.py (shared spawn)."""
from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ssl_lightning import SSLDataModule
from ssl_lightning.evaluation.checkpoint import load_module
from ssl_lightning.losses import nat_assign, nat_loss, npid_nce_loss, npid_nce_probs, npid_softmax_loss
from ssl_lightning.methods import METHODS, NPID, NoiseAsTargets
from ssl_lightning.modules import FrozenNormaliser, IndexedBank, NoiseTargets, last_occurrence
from ssl_lightning.registry import SSLError

from resume_utils import check_resume_is_exact  # tests/ is on sys.path

TINY = dict(backbone="convnet", backbone_kwargs={"width": 8}, in_channels=1, num_classes=0)


# ---- NPID losses ----------------------------------------------------------------------------------------------
def test_npid_nce_loss_matches_loop_transcription():
    torch.manual_seed(0)
    n, batch, k = 50, 3, 5
    probs = torch.rand(batch, k + 1) * 0.1
    total = 0.0
    for b in range(batch):  # NCECriterion: ln(P_pos / (P_pos + K Pn + eps)) + sum_k ln(K Pn / (P_k + K Pn + eps))
        total += math.log(probs[b, 0] / (probs[b, 0] + k / n + 1e-7))
        for j in range(1, k + 1):
            total += math.log((k / n) / (probs[b, j] + k / n + 1e-7))
    got = npid_nce_loss(probs, n)
    assert got.item() == pytest.approx(-total / batch, rel=1e-6)
    sheet = 0.0  # the sheet's form, -(sum log h_pos + sum log(1 - h_noise)) / B: equal up to the eps
    for b in range(batch):
        h = [float(p / (p + k / n + 1e-7)) for p in probs[b]]
        sheet += math.log(h[0]) + sum(math.log(1 - x) for x in h[1:])
    assert got.item() == pytest.approx(-sheet / batch, rel=1e-5)


def test_npid_nce_probs_match_loop():
    torch.manual_seed(1)
    v, rows = F.normalize(torch.randn(2, 4), dim=1), torch.randn(2, 3, 4)
    got = npid_nce_probs(v, rows, 0.07, 2.5)
    for b in range(2):
        for j in range(3):
            dot = sum(float(rows[b, j, c] * v[b, c]) for c in range(4))
            assert got[b, j].item() == pytest.approx(math.exp(dot / 0.07) / 2.5, rel=1e-5)


def test_npid_softmax_loss_matches_loop_and_gives_no_bank_gradient():
    torch.manual_seed(2)
    n, d, t = 7, 5, 0.1
    v = F.normalize(torch.randn(3, d), dim=1).requires_grad_()
    bank = F.normalize(torch.randn(n, d), dim=1).requires_grad_()
    index = torch.tensor([4, 0, 6])
    total = 0.0
    for b in range(3):
        logits = [sum(float(bank[j, c].detach() * v[b, c].detach()) for c in range(d)) / t for j in range(n)]
        total += -logits[int(index[b])] + math.log(sum(math.exp(x) for x in logits))
    loss = npid_softmax_loss(v, bank, index, t)
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    loss.backward()
    assert v.grad is not None and bank.grad is None


@pytest.mark.parametrize("k", [1, 16, 4096])
def test_npid_nce_loss_at_initialisation_is_the_sheets_invariant(k):
    # P = 1/n for every entry: h = 1/(K+1), loss = ln(K+1) + K ln(1 + 1/K) (9.318 for K 4096) -- plus, to first
    # order, n * eps * K/(K+1) from the official eps in each of the K noise terms' denominators (0.04 here; 0.13
    # for ImageNet's 1.28M images)
    n = 100 * k
    loss = npid_nce_loss(torch.full((8, k + 1), 1.0 / n), n)
    want = math.log(k + 1) + k * math.log(1 + 1 / k)
    assert loss.item() == pytest.approx(want + n * 1e-7 * k / (k + 1), rel=1e-4)
    assert npid_nce_loss(torch.full((8, k + 1), 1.0 / (k + 1)), k + 1).item() == pytest.approx(want, rel=1e-4)
    if k == 4096:
        assert want == pytest.approx(9.318, abs=1e-3)


def test_npid_method_loss_at_initialisation_near_invariant():
    # a fresh model: Z from the first batch makes the mean P exactly 1/n; at a high T every P is close to it
    torch.manual_seed(0)
    k, n = 64, 5000
    model = NPID(**TINY, nce_k=k, temperature=1.0, num_samples=n)
    views = [torch.randn(16, 1, 16, 16)]
    loss = model.loss(model.forward_views(views), views, torch.arange(16))
    assert model.normaliser.is_frozen and float(model.normaliser.z) > 0
    assert loss.item() == pytest.approx(math.log(k + 1) + k * math.log(1 + 1 / k), rel=0.01)


# ---- the memory bank and Z ---------------------------------------------------------------------------------------
def test_indexed_bank_init_momentum_update_unit_norm_and_only_batch_rows():
    bank = IndexedBank(30, 8, momentum=0.5, seed=3)
    stdv = 1 / math.sqrt(8 / 3)
    assert bank.bank.abs().max() <= stdv and bank.bank.min() < 0 < bank.bank.max()  # uniform(+-1/sqrt(d/3))
    assert torch.equal(bank.bank, IndexedBank(30, 8, seed=3).bank)  # seeded: every process starts the same
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        before = bank.bank.clone()
        index = torch.randperm(30, generator=g)[:6]
        values = F.normalize(torch.randn(6, 8, generator=g), dim=1)
        bank.update(index, values)
        for b, i in enumerate(index.tolist()):  # m_i <- normalise(0.5 m_i + 0.5 v_i)
            mixed = [0.5 * float(before[i, c]) + 0.5 * float(values[b, c]) for c in range(8)]
            norm = math.sqrt(sum(x * x for x in mixed))
            assert bank.bank[i].tolist() == pytest.approx([x / norm for x in mixed], abs=1e-6)
        others = torch.ones(30, dtype=torch.bool)
        others[index] = False
        assert torch.equal(bank.bank[others], before[others])
        torch.testing.assert_close(bank.bank[index].norm(dim=1), torch.ones(6))


def test_indexed_bank_duplicate_index_last_row_wins():
    bank = IndexedBank(5, 3, seed=0)
    before = bank.bank.clone()
    values = torch.eye(3)
    bank.update(torch.tensor([2, 4, 2]), values)  # sample 2 twice: its last row (e_3), from its old value
    torch.testing.assert_close(bank.bank[2], F.normalize(0.5 * before[2] + 0.5 * values[2], dim=0))
    torch.testing.assert_close(bank.bank[4], F.normalize(0.5 * before[4] + 0.5 * values[1], dim=0))
    assert last_occurrence(torch.tensor([3, 1, 3, 0, 1])).tolist() == [3, 4, 2]
    kept = bank.bank.clone()
    bank.update(torch.tensor([1, 3]), torch.tensor([[float("nan"), 0, 0], [0, 1, 0]]))  # a NaN embedding
    assert torch.equal(bank.bank[1], kept[1]) and not torch.equal(bank.bank[3], kept[3])


def test_frozen_normaliser_computed_once_then_frozen_and_restored():
    z = FrozenNormaliser(num_samples=200)
    assert float(z.z) == -1 and not z.is_frozen
    first = torch.rand(4, 6) + 0.5
    value = float(z(first))
    assert value == pytest.approx(200 * first.mean().item(), rel=1e-6)
    assert float(z(torch.rand(4, 6) * 10)) == value  # later batches leave it
    other = FrozenNormaliser(200)
    other.load_state_dict(z.state_dict())
    assert other.is_frozen and float(other(torch.ones(2, 2))) == value


# ---- NAT -------------------------------------------------------------------------------------------------------
def test_nat_loss_matches_loop():
    torch.manual_seed(0)
    f, c = F.normalize(torch.randn(4, 3), dim=1), F.normalize(torch.randn(4, 3), dim=1)
    want = sum(sum((float(f[i, j]) - float(c[i, j])) ** 2 for j in range(3)) for i in range(4)) / 4
    assert nat_loss(f, c).item() == pytest.approx(want, rel=1e-6)


def test_nat_assign_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        f = F.normalize(torch.randn(4, 5, generator=g), dim=1)
        c = F.normalize(torch.randn(4, 5, generator=g), dim=1)
        perm = nat_assign(f, c)
        assert sorted(perm.tolist()) == [0, 1, 2, 3]
        best = min(itertools.permutations(range(4)),
                   key=lambda p: sum(float((f[j] - c[p[j]]).pow(2).sum()) for j in range(4)))
        assert perm.tolist() == list(best)
    f[1] = float("nan")  # a NaN feature (a step on_nonfinite=skip drops): still a permutation
    assert sorted(nat_assign(f, c).tolist()) == [0, 1, 2, 3]


def test_noise_targets_unit_sphere_and_assignment_stays_a_permutation():
    state = NoiseTargets(24, 6, seed=1)
    torch.testing.assert_close(state.targets.norm(dim=1), torch.ones(24))
    assert torch.equal(state.targets, NoiseTargets(24, 6, seed=1).targets)
    targets0 = state.targets.clone()
    g = torch.Generator().manual_seed(0)
    changed = False
    for step in range(40):
        index = torch.randint(24, (8,), generator=g)  # duplicates allowed
        before = state.assignment.clone()
        state.reassign(index, F.normalize(torch.randn(8, 6, generator=g), dim=1))
        assert sorted(state.assignment.tolist()) == list(range(24))  # a permutation of the targets
        outside = torch.ones(24, dtype=torch.bool)
        outside[index] = False
        assert torch.equal(state.assignment[outside], before[outside])  # only the batch's images move...
        assert sorted(state.assignment[index.unique()].tolist()) == sorted(before[index.unique()].tolist())  # ...among their own targets
        changed |= not torch.equal(state.assignment, before)
    assert changed and torch.equal(state.targets, targets0)  # the targets themselves never change


def test_nat_method_assigns_then_regresses():
    torch.manual_seed(0)
    model = NoiseAsTargets(**TINY, target_dim=8, num_samples=12)
    views = [torch.randn(6, 1, 16, 16)]
    index = torch.tensor([0, 3, 5, 7, 9, 11])
    own = model.noise_targets.assignment[index].clone()
    loss = model.loss(model.forward_views(views), views, index)
    f = model.embed(model.forward_views(views)[0]).detach()
    got = model.noise_targets.assignment[index]
    assert sorted(got.tolist()) == sorted(own.tolist())
    assert loss.item() == pytest.approx(nat_loss(f, model.noise_targets.targets[got]).item(), rel=1e-5)
    # the new assignment is the best of the batch's targets: no swap of two images lowers the loss
    sims = f @ model.noise_targets.targets[got].T
    assert sims.trace() >= (f @ model.noise_targets.targets[own].T).trace() - 1e-6


# ---- configuration and errors ---------------------------------------------------------------------------------------
def test_registered_and_errors_name_the_fix():
    assert METHODS.get("npid") is NPID and METHODS.get("nat") is NoiseAsTargets
    with pytest.raises(SSLError, match="nce_k"):
        NPID(**TINY, nce_k=-1)
    with pytest.raises(SSLError, match="lower model.init_args.nce_k"):
        NPID(**TINY, nce_k=16, num_samples=16)
    model = NPID(**TINY)
    views = [torch.randn(2, 1, 16, 16)]
    with pytest.raises(SSLError, match="NPID has not built its memory bank: set model.init_args.num_samples"):
        model.loss(model.forward_views(views), views, torch.arange(2))
    nat = NoiseAsTargets(**TINY, target_dim=8)
    with pytest.raises(SSLError, match="NoiseAsTargets has not built its targets: set model.init_args.num_samples"):
        nat.loss(nat.forward_views(views), views, torch.arange(2))


def test_num_samples_mismatch_with_the_data_is_an_error(tmp_path):
    model = NoiseAsTargets(**TINY, num_samples=40, target_dim=8)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(SSLError, match="num_samples=40 rows but the pretraining set has 32"):
        trainer.fit(model, _data())


# ---- exact resume ---------------------------------------------------------------------------------------------
def _data() -> SSLDataModule:
    return SSLDataModule("synthetic", batch_size=8, num_workers=0, pin_memory=False, image_size=16,
                         dataset_options={"size": 32, "image_size": 16, "channels": 1})


def _npid(**kwargs) -> NPID:
    L.seed_everything(0)
    return NPID(**dict(TINY, num_classes=10), embed_dim=16, optimizer="sgd", lr=0.5, warmup_epochs=1, **kwargs)


def _perturb_all(model) -> None:  # restored state must not depend on the fresh model's (buffers included)
    for buf in model.buffers():
        buf.data.copy_(torch.randint_like(buf, 0, 3) if not buf.is_floating_point() else torch.randn_like(buf))
    torch.nn.init.normal_(next(model.parameters()))


@pytest.mark.parametrize("nce_k", [8, 0])
def test_npid_resume_is_exact(nce_k, tmp_path):
    # num_samples left None: the bank is built in setup from the data, before the checkpoint is restored into it
    runs = check_resume_is_exact(lambda: _npid(nce_k=nce_k), _data, tmp_path)
    sd = runs.straight.state_dict()
    assert runs.straight.hparams.num_samples == 32 == sd["memory.bank"].shape[0]
    assert not torch.equal(sd["memory.bank"], IndexedBank(32, 16, seed=0).bank)
    torch.testing.assert_close(sd["memory.bank"].norm(dim=1), torch.ones(32))  # every row written once per epoch
    if nce_k:
        first_z = float(runs.first.state_dict()["normaliser.z"])
        assert first_z > 0 and float(sd["normaliser.z"]) == first_z  # frozen after the first batch, restored
        assert int(sd["noise.draws"]) == runs.t_straight.global_step
    else:
        assert "normaliser.z" not in sd
    loaded = load_module(tmp_path / "epoch1.ckpt", method="npid")  # the evaluation commands' loader
    assert torch.equal(loaded.memory.bank, runs.first.memory.bank) and loaded.hparams.num_samples == 32


def test_nat_resume_is_exact(tmp_path):
    def model():
        L.seed_everything(0)
        return NoiseAsTargets(**dict(TINY, num_classes=10), target_dim=8, num_samples=32, optimizer="sgd", lr=0.5,
                              warmup_epochs=1)

    runs = check_resume_is_exact(model, _data, tmp_path, perturb=_perturb_all)
    assignment = runs.straight.state_dict()["noise_targets.assignment"]
    assert sorted(assignment.tolist()) == list(range(32)) and not torch.equal(assignment, torch.arange(32))


def test_nat_reads_back_only_the_similarity_matrix_and_npid_nce_nothing(tmp_path):
    """The Hungarian algorithm runs on the host: NAT's one device read per step is the batch's B x B similarities.
    NPID's NCE form (Z, noise draws) reads nothing (the exact softmax is in test_step_hygiene.py's list)."""
    from test_step_hygiene import CountReads, _cli

    cli = _cli("nat", tmp_path)
    counter = CountReads()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3 and cli.model.hparams.num_samples == 64
    assert counter.reads == ["numpy", "numpy"], counter.reads  # batches 2 and 3 (the first is not counted)

    cli = _cli("npid", tmp_path / "nce", "--model.init_args.nce_k", "8")  # the NCE form: Z, noise draws
    counter = CountReads()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3 and cli.model.normaliser.is_frozen
    assert counter.reads == [], counter.reads

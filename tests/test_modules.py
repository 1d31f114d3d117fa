"""Shared modules: EMA teachers, the momentum schedule, and the MemoryBank ring buffer."""
from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from torch import nn

from ssl_lightning.modules import MemoryBank, cosine_momentum, ema_update, momentum_copy
from ssl_lightning.registry import SSLError


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3))


def _train_bn(model: nn.Module, seed: int, steps: int = 3) -> None:
    """Move the BatchNorm running statistics (and num_batches_tracked) away from their init."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(5, 2, 6, 6, generator=g) * 2 + 1)


# ---- ema_update ------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0.0, 0.5, 0.9, 0.996, 1.0])
def test_ema_update_params_buffers_in_place(m):
    student, teacher = _net(0), _net(1)
    _train_bn(student, seed=2, steps=3)
    _train_bn(teacher, seed=3, steps=1)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = {k: v.clone() for k, v in student.state_dict().items()}
    param_objs = [p for p in teacher.parameters()]
    buffer_objs = [b for b in teacher.buffers()]
    data_ptrs = [t.data_ptr() for t in param_objs + buffer_objs]

    ema_update(teacher, student, m)

    param_names = {n for n, _ in teacher.named_parameters()}
    buffer_names = {n for n, _ in teacher.named_buffers()}
    assert any(n.endswith("num_batches_tracked") for n in buffer_names)
    t_after = teacher.state_dict()
    for name in param_names:
        expected = m * t_before[name] + (1 - m) * s_state[name]
        if m in (0.0, 1.0):  # the endpoints are exact copies
            assert torch.equal(t_after[name], s_state[name] if m == 0.0 else t_before[name]), name
        torch.testing.assert_close(t_after[name], expected, atol=1e-7, rtol=1e-6)
    for name in buffer_names:
        assert torch.equal(t_after[name], s_state[name]), name  # copied, not averaged
        assert t_after[name].dtype == s_state[name].dtype
    # in place: the very same tensor objects and storage
    assert all(a is b for a, b in zip(param_objs, teacher.parameters()))
    assert all(a is b for a, b in zip(buffer_objs, teacher.buffers()))
    assert data_ptrs == [t.data_ptr() for t in list(teacher.parameters()) + list(teacher.buffers())]
    # the student is untouched
    for k, v in student.state_dict().items():
        assert torch.equal(v, s_state[k]), k


def test_ema_update_repeated_matches_closed_form():
    student, teacher = _net(0), _net(1)
    t0 = [p.detach().clone().double() for p in teacher.parameters()]
    s = [p.detach().clone().double() for p in student.parameters()]
    m, steps = 0.9, 10
    for _ in range(steps):
        ema_update(teacher, student, m)
    for p, a, b in zip(teacher.parameters(), t0, s):
        expected = m ** steps * a + (1 - m ** steps) * b
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-5)


def test_ema_update_does_not_track_grad_and_rejects_mismatch():
    student = _net(0)
    teacher = momentum_copy(student)
    student[0].weight.data.add_(1.0)
    ema_update(teacher, student, 0.5)
    assert all(p.grad_fn is None and not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)


# ---- cosine_momentum -------------------------------------------------------------------------------
@pytest.mark.parametrize("base,final,total", [(0.99, 1.0, 100), (0.996, 1.0, 1001), (0.9, 0.999, 7)])
def test_cosine_momentum_schedule(base, final, total):
    assert cosine_momentum(0, total, base, final) == pytest.approx(base, abs=1e-12)
    assert cosine_momentum(total, total, base, final) == pytest.approx(final, abs=1e-12)
    assert cosine_momentum(total / 2, total, base, final) == pytest.approx((base + final) / 2, abs=1e-12)
    values = [cosine_momentum(s, total, base, final) for s in range(total + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone non-decreasing
    assert all(base - 1e-12 <= v <= final + 1e-12 for v in values)
    # BYOL's formula, written out
    for s in range(0, total + 1, max(1, total // 10)):
        ref = final - (final - base) * (math.cos(math.pi * s / total) + 1) / 2
        assert cosine_momentum(s, total, base, final) == pytest.approx(ref, abs=1e-12)
    assert cosine_momentum(total + 50, total, base, final) == pytest.approx(final)  # clamped


# ---- momentum_copy ---------------------------------------------------------------------------------
def test_momentum_copy_is_frozen_equal_and_independent():
    student = _net(0)
    _train_bn(student, seed=1)
    teacher = momentum_copy(student)
    assert all(p.requires_grad for p in student.parameters())  # the student stays trainable
    assert all(not p.requires_grad for p in teacher.parameters())
    for (n1, a), (n2, b) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr()  # a deep copy, no shared storage
    student[0].weight.data.add_(1.0)
    assert not torch.equal(student[0].weight, teacher[0].weight)


# ---- MemoryBank ------------------------------------------------------------------------------------
class RingReference:
    """A Python-list FIFO: the newest ``size`` enqueued rows, plus the slot each row was written to."""

    def __init__(self, initial: torch.Tensor) -> None:
        self.rows = [r.clone() for r in initial]
        self.size = len(self.rows)
        self.ptr = 0
        self.history: collections.deque = collections.deque(maxlen=self.size)

    def enqueue(self, keys: torch.Tensor) -> None:
        for k in keys:
            self.rows[self.ptr] = k.clone()
            self.history.append(k.clone())
            self.ptr = (self.ptr + 1) % self.size

    @property
    def filled(self) -> int:
        return len(self.history)


def _check(bank: MemoryBank, ref: RingReference) -> None:
    assert torch.equal(bank.bank, torch.stack(ref.rows))
    assert int(bank.ptr) == ref.ptr
    assert int(bank.filled) == ref.filled
    # FIFO order: the `filled` newest rows, oldest first, end just before ptr
    order = [(int(bank.ptr) - ref.filled + i) % bank.size for i in range(ref.filled)]
    if ref.filled:
        assert torch.equal(bank.bank[order], torch.stack(list(ref.history)))


def test_memory_bank_fifo_matches_list_reference():
    torch.manual_seed(0)
    size, dim = 37, 5
    bank = MemoryBank(size, dim)
    assert bank.bank.shape == (size, dim) and bank.size == size
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(size))  # random unit rows
    assert int(bank.ptr) == 0 and int(bank.filled) == 0
    ref = RingReference(bank.bank)
    g = torch.Generator().manual_seed(1)
    sizes = [1, 5, 12, 0, 19, 37, 3, 36, 8, 30, 2, 37, 11]  # wraps around many times, exact fills too
    for n in sizes:
        keys = torch.randn(n, dim, generator=g)
        bank.enqueue(keys, gather=False)
        ref.enqueue(keys)
        _check(bank, ref)
    assert int(bank.filled) == size


def test_memory_bank_enqueue_default_gather_single_process_and_dtype():
    bank = MemoryBank(6, 3, init="zeros")
    assert torch.equal(bank.bank, torch.zeros(6, 3))
    keys = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bank.enqueue(keys)  # gather=True is a no-op in a single process; keys are detached
    assert bank.bank.dtype == torch.float32 and not bank.bank.requires_grad
    torch.testing.assert_close(bank.bank[:4], keys.detach().float())
    assert int(bank.ptr) == 4 and int(bank.filled) == 4


def test_memory_bank_rejects_too_many_keys():
    bank = MemoryBank(8, 4)
    before = bank.bank.clone()
    with pytest.raises(ValueError):
        bank.enqueue(torch.randn(9, 4), gather=False)
    assert torch.equal(bank.bank, before) and int(bank.ptr) == 0 and int(bank.filled) == 0
    bank.enqueue(torch.randn(8, 4), gather=False)  # exactly size is fine
    assert int(bank.ptr) == 0 and int(bank.filled) == 8
    with pytest.raises(ValueError):
        MemoryBank(0, 4)


def test_memory_bank_update_writes_exactly_those_rows():
    torch.manual_seed(0)
    bank = MemoryBank(20, 6)
    bank.enqueue(torch.randn(7, 6), gather=False)
    before = bank.bank.clone()
    ptr, filled = int(bank.ptr), int(bank.filled)
    index = torch.tensor([3, 17, 0, 9])
    values = torch.randn(4, 6, requires_grad=True)
    bank.update(index, values, gather=False)
    expected = before.clone()
    for i, row in zip(index.tolist(), values.detach()):
        expected[i] = row
    assert torch.equal(bank.bank, expected)
    assert int(bank.ptr) == ptr and int(bank.filled) == filled  # addressing, not queueing


def test_memory_bank_state_dict_resume_equivalence():
    torch.manual_seed(0)
    size, dim = 23, 4
    g = torch.Generator().manual_seed(5)
    chunks = [torch.randn(n, dim, generator=g) for n in [5, 9, 13, 2, 23, 7, 11, 4]]
    a = MemoryBank(size, dim)
    for c in chunks[:3]:
        a.enqueue(c, gather=False)
    state = a.state_dict()
    assert {"bank", "ptr", "filled"} <= set(state)
    assert int(state["ptr"]) == (5 + 9 + 13) % size and int(state["filled"]) == size  # wrapped once
    state = {k: v.clone() for k, v in state.items()}

    torch.manual_seed(123)  # a different random init, overwritten by the load
    b = MemoryBank(size, dim)
    assert not torch.equal(a.bank, b.bank)
    b.load_state_dict(state)
    assert torch.equal(a.bank, b.bank) and int(a.ptr) == int(b.ptr) and int(a.filled) == int(b.filled)
    for c in chunks[3:]:
        a.enqueue(c, gather=False)
        b.enqueue(c, gather=False)
        assert torch.equal(a.bank, b.bank)
        assert int(a.ptr) == int(b.ptr) and int(a.filled) == int(b.filled)


def test_memory_bank_resume_before_full_keeps_filled():
    a = MemoryBank(10, 2)
    a.enqueue(torch.ones(3, 2), gather=False)
    b = MemoryBank(10, 2)
    b.load_state_dict(a.state_dict())
    assert int(b.ptr) == 3 and int(b.filled) == 3
    b.enqueue(torch.full((4, 2), 2.0), gather=False)
    assert int(b.ptr) == 7 and int(b.filled) == 7
    assert torch.equal(b.bank[3:7], torch.full((4, 2), 2.0)) and torch.equal(b.bank[:3], torch.ones(3, 2))


# ---- ViewNormalisation: the views' statistics for methods with raw-pixel targets --------------------------------
def test_view_normalisation_round_trips_and_refuses_to_guess():
    from types import SimpleNamespace

    from ssl_lightning.modules import ViewNormalisation

    norm = ViewNormalisation(3, owner="Colorization")
    assert not norm.known
    with pytest.raises(SSLError, match="Colorization does not know how its images were normalised: give mean and std"):
        norm.to_raw(torch.zeros(1, 3, 2, 2))
    norm.read(SimpleNamespace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5)))
    assert norm.known and norm.mean.tolist() == pytest.approx([0.5, 0.4, 0.3])
    raw = torch.rand(2, 3, 4, 4)
    views = (raw - norm.mean.view(1, -1, 1, 1)) / norm.std.view(1, -1, 1, 1)
    torch.testing.assert_close(norm.to_raw(views), raw)
    torch.testing.assert_close(norm.from_raw(0.0).flatten(), torch.tensor([-2.5, -1.6, -0.6]))
    norm.read(SimpleNamespace(mean=(0.0,) * 3, std=(1.0,) * 3))  # known statistics are kept
    assert norm.mean.tolist() == pytest.approx([0.5, 0.4, 0.3])
    # buffers: a checkpoint carries them
    other = ViewNormalisation(3)
    other.load_state_dict(norm.state_dict())
    assert sorted(norm.state_dict()) == ["mean", "std"] and torch.equal(other.std, norm.std)


@pytest.mark.parametrize("kw,match", [({"mean": (0.5,), "std": None}, "give both mean and std"),
                                       ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, "mean has 2 values for 3-channel"),
                                       ({"mean": (0.5,) * 3, "std": (0.2, 0.0, 0.2)}, "std must be positive")])
def test_view_normalisation_bad_statistics(kw, match):
    from ssl_lightning.modules import ViewNormalisation

    with pytest.raises(SSLError, match=match):
        ViewNormalisation(3, owner="AutoEncoder", **kw)


# ---- AllReduceSyncBatchNorm: in place, reversible, the plain layer outside a process group -----------------------
def test_all_reduce_sync_batchnorm_swaps_classes_in_place_and_back():
    from ssl_lightning.modules import AllReduceBatchNorm, AllReduceSyncBatchNorm, frozen_bn_stats

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 6), nn.BatchNorm1d(6))
    plain = copy.deepcopy(model)
    params = [id(p) for p in model.parameters()]
    AllReduceSyncBatchNorm().apply(model)
    assert isinstance(model[1], AllReduceBatchNorm) and isinstance(model[1], nn.BatchNorm2d)
    assert isinstance(model[4], AllReduceBatchNorm) and isinstance(model[4], nn.BatchNorm1d)
    assert [id(p) for p in model.parameters()] == params  # the same modules: optimizers and EMA copies unaffected
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), plain(x))  # one process: the plain layer
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean)
    with frozen_bn_stats(model):
        model(x)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var)
    AllReduceSyncBatchNorm().revert(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.BatchNorm1d

"""Forward passes that leave BatchNorm's running statistics untouched (VAT, MixMatch's extra batches).

vat_tf ``train_semisup.py`` updates the BatchNorm statistics in the labelled pass only: the clean unlabelled
pass and the perturbed pass run with ``update_batch_stats=False``, i.e. they NORMALISE with their own batch
statistics (train mode) but do not fold them into the running mean / variance. :func:`frozen_bn_stats` does
the same in PyTorch: inside it, every ``_BatchNorm`` (SyncBatchNorm included) in train mode keeps using batch
statistics while its ``running_mean``, ``running_var`` and ``num_batches_tracked`` are those of entry again on
exit (also for a layer with ``momentum=None``, the cumulative average).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s BatchNorm layers normalise with batch statistics (in train mode) but
    their running statistics stay as they were on entry: the layers work on copies of their buffers (with
    ``momentum`` 0), and the original tensors are put back on exit -- not copied into, since autograd may hold
    the copies for the backward of the passes made inside."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.running_mean, m.running_var, m.num_batches_tracked) for m in layers]
    for m in layers:
        m.momentum = 0.0
        m.running_mean, m.running_var = m.running_mean.clone(), m.running_var.clone()
        m.num_batches_tracked = m.num_batches_tracked.clone()
    try:
        yield module
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved):
            m.momentum, m.running_mean, m.running_var, m.num_batches_tracked = momentum, mean, var, count

"""Forward passes that leave BatchNorm's running statistics untouched (VAT, MixMatch's extra batches).

vat_tf ``train_semisup.py`` updates the BatchNorm statistics in the labelled pass only: the clean unlabelled
pass and the perturbed pass run with ``update_batch_stats=False``, i.e. they NORMALISE with their own batch
statistics (train mode) but do not fold them into the running mean / variance. :func:`frozen_bn_stats` does
the same in PyTorch: inside it, every ``_BatchNorm`` in train mode keeps using batch statistics while its
``running_mean``, ``running_var`` and ``num_batches_tracked`` are restored on exit (``momentum`` set to 0 so
nothing is folded in; the buffers are also restored, so a layer with ``momentum=None`` is covered).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s BatchNorm layers normalise with batch statistics (in train mode) but
    their running statistics stay as they were on entry."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield module
    finally:
        with torch.no_grad():
            for m, (momentum, mean, var, count) in zip(layers, saved):
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)

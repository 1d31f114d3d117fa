"""BatchNorm as the methods need it: passes that leave the running statistics alone, and batch statistics of the
global batch under DDP on any device.

* :func:`frozen_bn_stats`: vat_tf ``train_semisup.py`` updates the BatchNorm statistics in the labelled pass only:
  the clean unlabelled and perturbed passes run with ``update_batch_stats=False``, i.e. they NORMALISE with their
  own batch statistics (train mode) but do not fold them into the running mean / variance. The same serves
  MixMatch's extra batches and the pretext / autoencoder passes over tiles, patches and corrupted images, whose
  statistics must not become those the evaluations normalise whole clean images with.
* :class:`AllReduceSyncBatchNorm`: a Lightning ``LayerSync`` plugin (what ``trainer.sync_batchnorm`` does with
  torch's ``SyncBatchNorm``, which runs on GPUs only) that makes every BatchNorm layer normalise with the mean and
  variance of the global batch of all processes, on CPU / gloo too; the CLI uses it for ``--trainer.sync_batchnorm
  true`` on CPU. Under it a DDP run's batch statistics, losses and gradients are those of one process on the
  global batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module``'s BatchNorm layers normalise with batch statistics (in train mode) but their
    running statistics stay as they were on entry: the layers work on copies of their buffers (with ``momentum`` 0),
    and the original tensors are put back on exit -- not copied into, since autograd may hold the copies for the
    backward of the passes made inside. Also for a layer with ``momentum=None`` (the cumulative average)."""
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllReduceBatchNorm(_BatchNorm):
    """Mixed into a BatchNorm class by :class:`AllReduceSyncBatchNorm`: in training mode under a process group of
    more than one process, the per-channel sum, sum of squares and count of every process are all-reduced (with
    autograd, ``torch.distributed.nn``: the gradient flows through the statistics of all processes), and the layer
    normalises with the global mean and biased variance and folds the global unbiased variance into its running
    statistics, as one process would on the global batch. Otherwise it is the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.float()
        stats = torch.cat([xf.sum(dims), xf.square().sum(dims), xf.new_full((1,), x.numel() // c)])
        stats = dist_nn.all_reduce(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_CLASSES: dict[type, type] = {}


def _all_reduce_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"AllReduce{cls.__name__}", (AllReduceBatchNorm, cls), {"_plain_class": cls})
    return _CLASSES[cls]


class AllReduceSyncBatchNorm(LayerSync):
    """``--trainer.plugins ssl_lightning.modules.AllReduceSyncBatchNorm`` (or ``--trainer.sync_batchnorm true`` on
    CPU through the CLI): every BatchNorm layer of the model becomes its :class:`AllReduceBatchNorm` version, in
    place (the same module objects, parameters and buffers: EMA copies and optimizers are unaffected); ``revert``
    restores the plain classes."""

    def apply(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if isinstance(m, _BatchNorm) and not isinstance(m, (AllReduceBatchNorm, nn.SyncBatchNorm)):
                m.__class__ = _all_reduce_class(type(m))
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if isinstance(m, AllReduceBatchNorm):
                m.__class__ = m._plain_class
        return model

"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017; CuriousAI/mean-teacher
``pytorch/main.py``, ``mean_teacher/losses.py``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.registry import SSLError
from ssl_lightning.semi import softmax_mse


@METHODS.register("mean_teacher")
class MeanTeacher(SemiSupervisedMethod):
    """The teacher is the EMA of the student's weights, ``theta' <- alpha_t theta' + (1 - alpha_t) theta`` with
    ``alpha_t = min(1 - 1 / (step + 1), alpha)`` after every step (the base's EMA model with ``ema_warmup``, evaluated
    for val / test);
    consistency ``L_u = mean_{b, c} (softmax(f_theta(u))_bc - softmax(f_theta'(u~))_bc)^2`` between the student on
    one augmentation and the teacher on another (``data.unlabelled_views: [weak, weak]``), over the unlabelled AND
    the labelled images (the labelled batch has one view: the teacher sees the student's input there). The
    teacher runs in train mode (BatchNorm on its batch statistics) without gradient; its BatchNorm buffers are
    then set to the student's by the EMA update.

    Defaults: the consistency weight 100 with a 5-epoch sigmoid ramp-up (the paper's CIFAR-10 setting), alpha
    0.99. Not included: the second head with its logit-distance cost 0.01 of the Shake-Shake anchor. The
    supervised CE is averaged over the labelled batch (the official code divides it by the whole minibatch).

    Args:
        alpha: the teacher's EMA decay after the warm-up (0.99; 0.999 in the TensorFlow ConvNet setting).
        labelled_consistency: apply the consistency to the labelled batch too (the official code; the FixMatch
            repository's baseline applies it to the unlabelled images only).
        **kwargs: :class:`SemiSupervisedMethod` options.
    """

    def __init__(self, alpha: float = 0.99, lambda_u: float = 100.0, rampup: str = "sigmoid",
                 rampup_length: float = 5.0, rampup_unit: str = "epochs", labelled_consistency: bool = True,
                 **kwargs) -> None:
        ema_decay = kwargs.pop("ema_decay", None)
        if ema_decay is not None and ema_decay != alpha:
            raise SSLError(f"MeanTeacher: ema_decay={ema_decay}: the teacher is the EMA model, its decay is alpha="
                           f"{alpha}; set alpha instead (and leave ema_decay unset).")
        kwargs.pop("ema_warmup", None)
        super().__init__(ema_decay=alpha, ema_warmup=True, lambda_u=lambda_u, rampup=rampup,
                         rampup_length=rampup_length, rampup_unit=rampup_unit, **kwargs)

    def forward_batch(self, batch: SemiBatch) -> tuple[Tensor, list[Tensor]]:
        if len(batch.views) < 2:
            raise SSLError("MeanTeacher needs two views of every unlabelled image (student, teacher): set "
                           "data.unlabelled_views: [weak, weak] (or data.k_unlabelled: 2).")
        student = SemiBatch(batch.x, batch.y, batch.labelled_index, batch.views[:1], batch.index)
        return super().forward_batch(student)  # the student: labelled + the first view, one pass

    def unlabelled_loss(self, batch: SemiBatch) -> tuple[Tensor, dict[str, Tensor]]:
        labelled = self.hparams.labelled_consistency
        with torch.no_grad():
            teacher_input = torch.cat([batch.x, batch.views[1]]) if labelled else batch.views[1]
            teacher = torch.softmax(self.logits(teacher_input, ema=True), dim=1)
        student = torch.cat([batch.logits, batch.view_logits[0]]) if labelled else batch.view_logits[0]
        return softmax_mse(student, teacher), {}

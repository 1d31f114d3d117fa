"""The supervised-only baseline of semi-supervised tables: the labelled subset alone, with the same backbone,
augmentation and budget as the semi-supervised methods (Oliver et al., "Realistic Evaluation of Deep
Semi-Supervised Learning Algorithms", NeurIPS 2018)."""
from __future__ import annotations

from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised.base import SemiSupervisedMethod


@METHODS.register("supervised")
class Supervised(SemiSupervisedMethod):
    """``L = CE(f(x_l), y_l)``: the unlabelled stream, if the data module has one, is ignored (use
    ``data.mu: 0`` to not load it at all)."""

    needs_unlabelled = False

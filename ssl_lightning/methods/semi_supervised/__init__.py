"""Semi-supervised methods: a backbone and a linear classifier trained on a few labelled images and many
unlabelled ones (:class:`~ssl_lightning.data.SemiSupervisedDataModule`), the shared pieces in
:mod:`ssl_lightning.semi`. Every method can start from a self-supervised run (``init_backbone``)."""
from ssl_lightning.methods.semi_supervised.base import SemiBatch, SemiSupervisedMethod
from ssl_lightning.methods.semi_supervised.fixmatch import FixMatch
from ssl_lightning.methods.semi_supervised.entropy_minimisation import EntropyMinimisation
from ssl_lightning.methods.semi_supervised.mean_teacher import MeanTeacher
from ssl_lightning.methods.semi_supervised.mixmatch import MixMatch
from ssl_lightning.methods.semi_supervised.pi_model import PiModel
from ssl_lightning.methods.semi_supervised.pseudo_label import PseudoLabel
from ssl_lightning.methods.semi_supervised.supervised import Supervised
from ssl_lightning.methods.semi_supervised.temporal_ensembling import TemporalEnsembling
from ssl_lightning.methods.semi_supervised.vat import VAT

__all__ = ["EntropyMinimisation", "MeanTeacher", "PiModel", "PseudoLabel", "SemiBatch", "SemiSupervisedMethod",
           "Supervised", "TemporalEnsembling"]
__all__ += ["FixMatch", "MixMatch", "VAT"]

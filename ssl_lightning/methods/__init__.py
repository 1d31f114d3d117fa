"""Methods, grouped by family in sub-packages (``joint_embedding/``, ``instance/``, ``clustering/``,
``mutual_information/``, ``pretext/``, ``autoencoding/``, ``metric/``, ``semi_supervised/``);
each registers itself in the one ``METHODS`` registry under its paper's name, and every class is importable from
here."""
import sys as _sys

from ssl_lightning.methods import joint_embedding as _joint_embedding
from ssl_lightning.methods.autoencoding import AutoEncoder, ContextEncoder, DenoisingAutoEncoder
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.clustering import DeepCluster
from ssl_lightning.methods.instance import NPID, NoiseAsTargets
from ssl_lightning.methods.joint_embedding import (BYOL, DINO, TWIST, WMSE, BarlowTwins, DiscPro, GenPro, MoCoV1,
                                                   MoCoV2, MoCoV3, MuConPro, SimCLR, SimSiam, SwAV, VICReg)
from ssl_lightning.methods.metric import Siamese
from ssl_lightning.methods.mutual_information import CPC, DeepInfoMax
from ssl_lightning.methods.pretext import Colorization, ContextPrediction, Jigsaw, Rotation, SplitBrain
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.methods.semi_supervised import (VAT, EntropyMinimisation, FixMatch, MeanTeacher, MixMatch, PiModel,
                                                   PseudoLabel, SemiSupervisedMethod, Supervised, TemporalEnsembling)

# the module paths from before the families (``ssl_lightning.methods.moco.MoCoV2``): checkpoints (``_class_path``)
# and run configs written then name them, so they still load
for _name in ("barlow_twins", "byol", "dino", "moco", "mocov3", "muconpro", "simclr", "simsiam", "swav", "twist",
              "vicreg", "wmse"):
    _sys.modules.setdefault(f"{__name__}.{_name}", _sys.modules[f"{_joint_embedding.__name__}.{_name}"])

__all__ = ["AutoEncoder", "BarlowTwins", "BYOL", "Colorization", "ContextEncoder", "ContextPrediction", "CPC",
           "DeepCluster", "DeepInfoMax", "DenoisingAutoEncoder", "DINO", "DiscPro", "EntropyMinimisation",
           "FixMatch", "GenPro", "Jigsaw", "MeanTeacher", "METHODS", "MixMatch", "MoCoV1", "MoCoV2", "MoCoV3",
           "MuConPro", "NoiseAsTargets", "NPID", "PiModel", "PseudoLabel", "Rotation", "SemiSupervisedMethod",
           "Siamese", "SimCLR", "SimSiam", "SplitBrain", "SSLMethod", "Supervised", "SwAV", "TemporalEnsembling",
           "TWIST", "VAT", "VICReg", "WMSE"]

"""Joint-embedding methods: two or more views of an image mapped to agreeing embeddings, kept from
collapsing by negatives (SimCLR, MoCo v1/v2/v3, MuConPro), a momentum teacher or a stop-gradient (BYOL,
SimSiam, DINO), clustering (SwAV, TWIST) or redundancy reduction and whitening (Barlow Twins, VICReg, W-MSE)."""
from ssl_lightning.methods.joint_embedding.barlow_twins import BarlowTwins
from ssl_lightning.methods.joint_embedding.byol import BYOL
from ssl_lightning.methods.joint_embedding.dino import DINO
from ssl_lightning.methods.joint_embedding.moco import MoCoV1, MoCoV2
from ssl_lightning.methods.joint_embedding.mocov3 import MoCoV3
from ssl_lightning.methods.joint_embedding.muconpro import DiscPro, GenPro, MuConPro
from ssl_lightning.methods.joint_embedding.simclr import SimCLR
from ssl_lightning.methods.joint_embedding.simsiam import SimSiam
from ssl_lightning.methods.joint_embedding.swav import SwAV
from ssl_lightning.methods.joint_embedding.twist import TWIST
from ssl_lightning.methods.joint_embedding.vicreg import VICReg
from ssl_lightning.methods.joint_embedding.wmse import WMSE

__all__ = ["BYOL", "BarlowTwins", "DINO", "DiscPro", "GenPro", "MoCoV1", "MoCoV2", "MoCoV3", "MuConPro", "SimCLR",
           "SimSiam", "SwAV", "TWIST", "VICReg", "WMSE"]

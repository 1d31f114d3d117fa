"""Mutual-information losses: Deep InfoMax's estimators (JSD, DV, InfoNCE), its local / global score layout and
its prior-matching terms (Hjelm et al. 2019); CPC's InfoNCE over a patch grid, each prediction against every patch of
the (global) batch (Oord et al. 2018)."""
from ssl_lightning.losses.mutual_information.cpc import cpc_infonce
from ssl_lightning.losses.mutual_information.dim import (DIM_ESTIMATORS, dim_loss, dim_scores, dv_mi_loss,
                                                         infonce_mi_loss, jsd_mi_loss, prior_discriminator_loss,
                                                         prior_encoder_loss)

__all__ = ["DIM_ESTIMATORS", "cpc_infonce", "dim_loss", "dim_scores", "dv_mi_loss", "infonce_mi_loss", "jsd_mi_loss",
           "prior_discriminator_loss", "prior_encoder_loss"]

"""Mutual-information methods: Deep InfoMax (Hjelm et al. 2019), an image's encoding against its local features
through learned MI estimators; Contrastive Predictive Coding (Oord et al. 2018; Henaff et al. 2020), a patch grid's
masked autoregressive context predicting the patches below it, InfoNCE against the batch's other patches."""
from ssl_lightning.methods.mutual_information.cpc import CPC
from ssl_lightning.methods.mutual_information.dim import DeepInfoMax

__all__ = ["CPC", "DeepInfoMax"]

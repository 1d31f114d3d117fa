"""Mutual-information methods: Contrastive Predictive Coding (Oord et al. 2018; Henaff et al. 2020), a patch grid's
masked autoregressive context predicting the patches below it, InfoNCE against the batch's other patches."""
from ssl_lightning.methods.mutual_information.cpc import CPC

__all__ = ["CPC"]

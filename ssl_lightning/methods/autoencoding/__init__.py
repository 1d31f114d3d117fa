"""Reconstruction methods: an encoder (the backbone) and a decoder matching it (:mod:`ssl_lightning.decoders`)
trained to give back the input -- autoencoder, denoising autoencoder (Vincent et al. 2008) and context encoder
(Pathak et al. 2016). The representation is the backbone's pooled features, as for every method."""
from ssl_lightning.methods.autoencoding.autoencoder import AutoEncoder, DenoisingAutoEncoder
from ssl_lightning.methods.autoencoding.context_encoder import ContextEncoder

__all__ = ["AutoEncoder", "ContextEncoder", "DenoisingAutoEncoder"]

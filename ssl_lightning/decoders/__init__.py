"""Decoders matching the backbones: ``build_decoder(backbone, out_channels, image_size)`` maps the backbone's feature
map (or its pooled features) back to images ``(B, out_channels, H, W)``, for the autoencoders, the context encoder and
dense prediction (colorization's ab bins at a quarter of the resolution: ``out_channels=313, out_stride=4``); and the
DCGAN-style discriminator of the context encoder's adversarial term."""
from ssl_lightning.decoders.discriminator import DCGANDiscriminator
from ssl_lightning.decoders.registry import DECODERS, build_decoder
from ssl_lightning.decoders.upsampling import UpsamplingDecoder, convnet_decoder, resnet_decoder

__all__ = ["DECODERS", "DCGANDiscriminator", "UpsamplingDecoder", "build_decoder", "convnet_decoder", "resnet_decoder"]

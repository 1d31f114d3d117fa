"""CPC's autoregressive context network over a grid of patch embeddings: a PixelCNN-style residual stack of
convolutions masked by rows (Oord et al. 2018, sec. 3.2; Henaff et al. 2020), so that the context ``c[i, j]``
depends on the embeddings of rows ``<= i`` only and can predict the rows below without seeing them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowMaskedConv2d(nn.Conv2d):
    """A ``kernel`` x ``kernel`` convolution whose window covers only the current row and the ``kernel - 1`` rows
    above it (its mask keeps the kernel's top rows; implemented as padding above only): output row i sees input
    rows ``i - kernel + 1 .. i``, every column within ``kernel // 2``. Output size = input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        super().__init__(in_channels, out_channels, (kernel, kernel))
        self.causal_padding = (kernel // 2, kernel // 2, kernel - 1, 0)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_padding))


class ContextBlock(nn.Module):
    """PixelCNN-style bottleneck residual block: ``x + conv1x1(relu(masked_conv(relu(conv1x1(relu(x))))))``."""

    def __init__(self, channels: int, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.masked = RowMaskedConv2d(hidden, hidden, kernel)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(F.relu(self.masked(F.relu(self.reduce(F.relu(x))))))


class ContextNetwork(nn.Sequential):
    """``blocks`` :class:`ContextBlock` s on a grid (B, D, rows, cols) -> contexts of the same shape; stacking keeps
    the row masking (row i still sees rows <= i only), each block widening the view by ``kernel - 1`` rows up."""

    def __init__(self, channels: int, hidden: int, blocks: int = 5, kernel: int = 3) -> None:
        super().__init__(*(ContextBlock(channels, hidden, kernel) for _ in range(blocks)))

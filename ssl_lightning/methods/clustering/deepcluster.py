"""DeepCluster (Caron, Bojanowski, Joulin & Douze, "Deep Clustering for Unsupervised Learning of Visual
Features", ECCV 2018; facebookresearch/deepcluster ``main.py``, ``clustering.py``, ``util.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.backbones import build_backbone
from ssl_lightning.backbones.sobel import SobelBackbone
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.clustering.epoch_clustering import EpochClustering
from ssl_lightning.methods.registry import METHODS
from ssl_lightning.optim import param_groups


def top_mlp(dims: list[int]) -> nn.Sequential:
    """The official ``classifier`` on the conv features: ``Dropout(0.5) -> Linear`` per layer, ReLU between
    (AlexNet / VGG: 4096, 4096). It ends on a Linear: these outputs are clustered; the classifier sees them after a
    ReLU. ``[d]`` (no hidden widths) gives the identity."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers += ([nn.ReLU(inplace=True)] if i else []) + [nn.Dropout(0.5), nn.Linear(d_in, d_out)]
    return nn.Sequential(*layers)


@METHODS.register("deepcluster")
class DeepCluster(EpochClustering, SSLMethod):
    """Every epoch: cluster the whole training set's features ``h = top(g(x))`` (eval mode, centre crops;
    PCA-whitening to ``pca_dim``, L2, k-means with k = ``num_clusters``) into pseudo-labels y, re-initialise the
    classifier W (N(0, 0.01) weights, zero bias) with a fresh optimizer state, then train the epoch on
    ``L = CE(W relu(h), y)`` (W applied to ``h`` itself when there is no ``top``) with images drawn uniformly over
    the non-empty clusters. The clustering step, its DDP handling and the sampler: :mod:`.epoch_clustering`.

    Optimizer: the classifier is its own parameter group without momentum (the official ``optimizer_tl``: plain
    SGD at the backbone's lr and weight decay), and its optimizer state is dropped every epoch; the backbone's (and
    top's) momentum buffers carry over across epochs, as the official single optimizer made before the epoch loop.
    One view per image (``data.views`` with ``count: 1``; official: RandomResizedCrop + flip).

    Args:
        num_clusters: k (10000 on ImageNet; no official CIFAR value, ~10x the classes is usual).
        pca_dim: PCA-whitening dimension (256); 0 = L2 normalisation only. At most the clustered width.
        kmeans_iters: k-means iterations (20).
        top_dims: hidden widths of the official MLP ``top`` on the backbone (``[4096, 4096]`` for AlexNet / VGG);
            ``[]`` (default): cluster and classify the backbone's pooled features (ResNets and the small ConvNet
            end in global pooling, and kNN / probes evaluate those same features).
        sobel: the fixed grayscale + Sobel front end (official for ImageNet; colour images only).
        cluster_seed: seeds k-means (a new seed each epoch from it) and the classifier's re-initialisation
            (the sampler's order follows the datamodule's seed).
        num_samples: images of the training set (pseudo-label rows); None = from the datamodule.
    """

    def __init__(self, num_clusters: int = 10000, pca_dim: int = 256, kmeans_iters: int = 20,
                 top_dims: list[int] | None = None, sobel: bool = False, cluster_seed: int = 0,
                 num_samples: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        hp = self.hparams
        if sobel:  # the backbone takes the 2 gradient channels
            self.backbone = SobelBackbone(build_backbone(hp.backbone, in_channels=2, **(hp.backbone_kwargs or {})),
                                          hp.in_channels)
            if hp.compile:
                self.backbone.compile()
        dims = [self.backbone.num_features, *(top_dims or [])]
        self.top = top_mlp(dims)
        self.classifier = nn.Linear(dims[-1], num_clusters)
        if num_samples is not None:
            self.build_state(num_samples)

    @property
    def cluster_dim(self) -> int:
        return self.classifier.in_features

    def cluster_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.top(self.backbone(images))

    def on_new_clusters(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.hparams.cluster_seed * 1_000_003 + epoch)
        w = self.classifier.weight
        w.data.copy_(torch.randn(w.shape, generator=g) * 0.01)
        self.classifier.bias.data.zero_()

    def fresh_parameters(self) -> list[nn.Parameter]:
        return list(self.classifier.parameters())

    def extra_param_groups(self) -> list[dict]:
        return param_groups(self.classifier.parameters(), self.hparams.weight_decay, momentum=0.0, name="classifier")

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.top(feats)
        return self.classifier(F.relu(h) if len(self.top) else h)

    def class_probabilities(self, feats: torch.Tensor) -> torch.Tensor:
        """Softmax over the current epoch's clusters: ``ClusterMonitor`` scores them against the true classes
        (the paper's NMI-to-labels curve)."""
        return self.logits(feats).softmax(dim=1)

    def loss(self, feats: list[torch.Tensor], views: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        self.require_state()
        return F.cross_entropy(self.logits(feats[0]), self.assignments.labels[index.to(self.assignments.labels.device)])

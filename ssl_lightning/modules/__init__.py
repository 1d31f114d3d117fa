from ssl_lightning.modules.batchnorm import AllReduceBatchNorm, AllReduceSyncBatchNorm, frozen_bn_stats
from ssl_lightning.modules.ema import cosine_momentum, ema_update, momentum_copy
from ssl_lightning.modules.indexed_bank import IndexedBank, gather_rows, last_occurrence
from ssl_lightning.modules.kmeans import ClusterAssignments
from ssl_lightning.modules.memory_bank import MemoryBank
from ssl_lightning.modules.nce_normaliser import FrozenNormaliser
from ssl_lightning.modules.noise_targets import NoiseTargets
from ssl_lightning.modules.normalisation import ViewNormalisation

__all__ = ["AllReduceBatchNorm", "AllReduceSyncBatchNorm", "ClusterAssignments", "FrozenNormaliser", "IndexedBank",
           "MemoryBank", "NoiseTargets", "ViewNormalisation", "cosine_momentum", "ema_update", "frozen_bn_stats", "gather_rows", "last_occurrence", "momentum_copy"]

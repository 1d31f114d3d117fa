from ssl_lightning.modules.ema import cosine_momentum, ema_update, momentum_copy
from ssl_lightning.modules.indexed_bank import IndexedBank, gather_rows, last_occurrence
from ssl_lightning.modules.kmeans import ClusterAssignments
from ssl_lightning.modules.memory_bank import MemoryBank
from ssl_lightning.modules.nce_normaliser import FrozenNormaliser
from ssl_lightning.modules.noise_targets import NoiseTargets

__all__ = ["FrozenNormaliser", "IndexedBank", "MemoryBank", "NoiseTargets", "gather_rows", "last_occurrence", "cosine_momentum", "ema_update", "momentum_copy"]
__all__ += ["ClusterAssignments"]

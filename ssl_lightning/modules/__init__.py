from ssl_lightning.modules.ema import cosine_momentum, ema_update, momentum_copy
from ssl_lightning.modules.memory_bank import MemoryBank

__all__ = ["MemoryBank", "cosine_momentum", "ema_update", "momentum_copy"]

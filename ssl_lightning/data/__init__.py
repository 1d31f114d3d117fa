from ssl_lightning.data.batch_views import BatchMultiView
from ssl_lightning.data.datamodule import TRAIN_EVAL, VAL, SSLDataModule
from ssl_lightning.data.datasets import DATASETS, DatasetSpec
from ssl_lightning.data.views import MultiViewTransform, ViewConfig, view_preset

__all__ = ["BatchMultiView", "DATASETS", "DatasetSpec", "MultiViewTransform", "SSLDataModule", "TRAIN_EVAL", "VAL",
           "ViewConfig", "view_preset"]

from ssl_lightning.data.batch_views import BatchMultiView
from ssl_lightning.data.datamodule import TRAIN_EVAL, VAL, SSLDataModule
from ssl_lightning.data.datasets import DATASETS, DatasetSpec
from ssl_lightning.data.label_split import LabelSplit, make_label_split
from ssl_lightning.data.semi import SemiSupervisedDataModule
from ssl_lightning.data.semi_views import StrongAugment, WeakAugment
from ssl_lightning.data.views import MultiViewTransform, ViewConfig, view_preset

__all__ = ["BatchMultiView", "DATASETS", "DatasetSpec", "LabelSplit", "MultiViewTransform", "SSLDataModule",
           "SemiSupervisedDataModule", "StrongAugment", "TRAIN_EVAL", "VAL", "ViewConfig", "WeakAugment",
           "make_label_split", "view_preset"]

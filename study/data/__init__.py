"""Datasets as in-memory tensors, train/validation splits and device-resident batching.

``_registry`` holds the dataset registry, ``DatasetBundle`` and the splits/batching helpers;
``_readers`` reads each dataset's files in their native (torchvision) formats or generates them.
"""

from study.data._registry import (
    DATASETS,
    DatasetBundle,
    DatasetEntry,
    DeviceBatches,
    cache_root,
    dataset_options,
    epoch_order,
    list_datasets,
    load_dataset,
    random_crop,
    random_flip,
    split_train_val,
)

__all__ = [
    "DATASETS",
    "DatasetBundle",
    "DatasetEntry",
    "DeviceBatches",
    "cache_root",
    "dataset_options",
    "epoch_order",
    "list_datasets",
    "load_dataset",
    "random_crop",
    "random_flip",
    "split_train_val",
]

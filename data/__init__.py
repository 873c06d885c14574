"""Data: RecordIO, verification .bin files, datasets, samplers, CPU and DALI loaders."""

from data.dali_loader import DaliLoader, build_dali_loader
from data.datasets import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    RecordDataset,
    SyntheticDataset,
    image_keys_of,
)
from data.decode import decode_image, normalize
from data.loader import TrainLoader, build_cpu_loader, flip_mask
from data.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack,
    read_property,
    unpack,
)
from data.sampler import DistributedShardSampler, epoch_permutation
from data.verification_bin import load_bin, write_bin

__all__ = [
    "IMAGE_EXTENSIONS",
    "DaliLoader",
    "DistributedShardSampler",
    "IRHeader",
    "ImageFolderDataset",
    "RecordDataset",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "SyntheticDataset",
    "TrainLoader",
    "build_cpu_loader",
    "build_dali_loader",
    "decode_image",
    "epoch_permutation",
    "flip_mask",
    "image_keys_of",
    "load_bin",
    "normalize",
    "pack",
    "read_property",
    "unpack",
    "write_bin",
]

"""Training data: caption files and WebDataset shards, an exact resumable loader, shard packing.

``open_dataset(path)`` opens a CSV/TSV/JSONL caption file or tar shards and fails fast on
configuration errors; ``make_train_loader(dataset, preprocess, tokenize, batch_size, epoch=...,
rank=..., world_size=..., start_batch=...)`` yields one epoch's batches on one rank; ``write_shards``
packs a folder plus caption file into shards.
"""
from .captions import CaptionDataset
from .loader import Batch, TrainLoader, make_train_loader, open_dataset, plan_lanes
from .order import EpochPlan, remaining_positions
from .shards import ShardsWritten, write_shards
from .skips import SkipCounter, TooManyBadSamples
from .webdataset import ShardDataset

__all__ = [
    "Batch",
    "CaptionDataset",
    "EpochPlan",
    "ShardDataset",
    "ShardsWritten",
    "SkipCounter",
    "TooManyBadSamples",
    "TrainLoader",
    "make_train_loader",
    "open_dataset",
    "plan_lanes",
    "remaining_positions",
    "write_shards",
]

"""The training batch sampler and loader.

Reproducibility: the order of training samples and the seed of each sample's augmentation are a
pure function of ``(train.seed, epoch, position)`` (see :class:`TrainBatchSampler`), and each
sample is loaded under its own torch seed without touching the main process' RNG.
"""

from __future__ import annotations

import functools
import math
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from codetr.data.batch import collate
from codetr.structures import Batch

# The signals that stop training after a step (codetr.training.signals); the loader workers ignore them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM (a Ctrl-C reaches the whole
    process group), so they keep serving until the main process has stopped cleanly."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``(dataset index, sample seed)`` for this process.

    Epoch ``e`` is a pure function of ``(seed, e)``: an order of the dataset and one seed per
    position. ``set_epoch(e, start_batch=k)`` makes the next iteration start at batch ``k`` (resume).

    ``groups`` (one group id per dataset index, e.g. :meth:`CocoDetection.aspect_ratio_groups`)
    batches images of one group together, as mmdet's ``DistributedGroupSampler``: each group is
    shuffled and padded by repeating its own images to a multiple of ``batch_size * world_size``,
    the groups are concatenated, the batches shuffled, and process ``rank`` takes the ``rank``-th
    of ``world_size`` equal consecutive parts. Every batch is then of one group.
    Without ``groups``, the permutation is padded by wrapping around to a multiple of
    ``world_size`` and process ``rank`` takes every ``world_size``-th item.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 groups: Sequence[int] | None = None) -> None:
        if size <= 0:
            raise ValueError("the training set is empty")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if groups is not None and len(groups) != size:
            raise ValueError(f"{len(groups)} group ids for a dataset of {size} images")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.groups = None if groups is None else torch.as_tensor(groups, dtype=torch.int64)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.groups is None:
            return math.ceil(math.ceil(self.size / self.world_size) / self.batch_size)
        per_step = self.batch_size * self.world_size
        return sum(math.ceil(int(n) / per_step) for n in torch.bincount(self.groups))

    def _grouped_order(self, generator: torch.Generator) -> list[int]:
        """All processes' items of the epoch: whole batches of one group, batches shuffled."""
        assert self.groups is not None
        per_step = self.batch_size * self.world_size
        order: list[int] = []
        for group in range(int(self.groups.max()) + 1):
            members = torch.nonzero(self.groups == group).squeeze(1)
            if len(members) == 0:
                continue
            shuffled = members[torch.randperm(len(members), generator=generator)].tolist()
            padded = math.ceil(len(shuffled) / per_step) * per_step
            order += [shuffled[i % len(shuffled)] for i in range(padded)]
        batches = torch.randperm(len(order) // self.batch_size, generator=generator).tolist()
        return [order[b * self.batch_size + i] for b in batches for i in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.groups is None:
            order = torch.randperm(self.size, generator=generator).tolist()
            seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
            total = math.ceil(self.size / self.world_size) * self.world_size
            items = [(order[i % self.size], seeds[i % self.size]) for i in range(total)][self.rank::self.world_size]
        else:
            order = self._grouped_order(generator)
            seeds = torch.randint(0, 2**62, (len(order),), generator=generator).tolist()
            share = len(self) * self.batch_size
            items = list(zip(order, seeds))[self.rank * share:(self.rank + 1) * share]
        for b in range(self.start_batch, len(self)):
            yield items[b * self.batch_size:(b + 1) * self.batch_size]


class SeededSamples(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` loaded under torch seed ``seed``.

    The caller's torch RNG state is left untouched. (Training transforms must draw their
    randomness from torch, as torchvision's transforms do.)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def micro_batches(samples: Sequence[Any], size: int, size_divisor: int = 1) -> list[Batch]:
    """The samples of one iteration, collated in consecutive micro-batches of ``size`` (the last may be
    smaller), each padded to a multiple of ``size_divisor``."""
    return [collate(samples[i:i + size], size_divisor) for i in range(0, len(samples), size)]


def train_loader(dataset: Dataset, sampler: TrainBatchSampler, num_workers: int, seed: int,
                 micro_batch_size: int | None = None, size_divisor: int = 1) -> DataLoader:
    """The training DataLoader: batches from ``sampler``, each sample under its own seed, each
    batch as a list of micro-batches of ``micro_batch_size`` samples (None: one micro-batch),
    padded to a multiple of ``size_divisor``.

    The loader has its own generator, so iterating it never draws from the global torch RNG.
    """
    collate_fn = functools.partial(micro_batches, size=micro_batch_size or sampler.batch_size,
                                   size_divisor=size_divisor)
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals)

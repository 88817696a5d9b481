"""Aspect-ratio buckets and the batch order of every epoch, as pure functions.

Each image trains at every `dataset.resolutions` size it can reach without upscaling,
cropped to the nearest bucket of the same aspect. A batch never mixes buckets, and each
epoch's batches are dealt to the ranks so that every rank sees a distinct shard.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

#: Bucket sides are multiples of 16: the VAE divides by 8, and FLUX packs latents 2x2.
BUCKET_STEP = 16


@dataclass(frozen=True)
class Item:
    """One training example: image `index` at bucket `size` (width, height)."""

    index: int
    size: tuple[int, int]


def bucket_size(width: int, height: int, resolution: int, smallest: bool = False) -> tuple[int, int] | None:
    """(w, h) with area about `resolution`², the image's aspect, sides multiples of 16.

    `None` when reaching that area would upscale the image; the smallest resolution
    instead falls back to the image's own size, so no image is dropped.
    """
    scale = math.sqrt(resolution * resolution / (width * height))
    if scale > 1.0:
        if not smallest:
            return None
        scale = 1.0
    w = int(width * scale) // BUCKET_STEP * BUCKET_STEP
    h = int(height * scale) // BUCKET_STEP * BUCKET_STEP
    if w < BUCKET_STEP * 4 or h < BUCKET_STEP * 4:
        return None
    return (w, h)


def make_items(sizes: list[tuple[int, int]], resolutions: list[int]) -> list[Item]:
    """Every (image, bucket) pair that the resolutions allow."""
    items = []
    for i, (w, h) in enumerate(sizes):
        seen = set()
        for r in sorted(resolutions):
            b = bucket_size(w, h, r, smallest=(r == min(resolutions)))
            if b is not None and b not in seen:
                seen.add(b)
                items.append(Item(i, b))
    return items


def epoch_batches(items: list[Item], batch_size: int, seed: int, epoch: int) -> list[list[Item]]:
    """The shuffled batches of one epoch; each batch from one bucket, incomplete ones dropped."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    for it in items:
        by_bucket.setdefault(it.size, []).append(it)
    batches = []
    for size in sorted(by_bucket):
        group = by_bucket[size][:]
        rng.shuffle(group)
        batches += [group[i:i + batch_size] for i in range(0, len(group) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_rank(items: list[Item], batch_size: int, world_size: int) -> int:
    """Batches each rank gets per epoch (equal on every rank, so collectives line up)."""
    by_bucket: dict[tuple[int, int], int] = {}
    for it in items:
        by_bucket[it.size] = by_bucket.get(it.size, 0) + 1
    return sum(n // batch_size for n in by_bucket.values()) // world_size


def rank_batch(items: list[Item], batch_size: int, seed: int, world_size: int, rank: int,
               micro_step: int) -> list[Item]:
    """The batch that `rank` trains on at global `micro_step`; derived, so resuming needs no state."""
    per_rank = batches_per_rank(items, batch_size, world_size)
    epoch, pos = divmod(micro_step, per_rank)
    batches = epoch_batches(items, batch_size, seed, epoch)
    return batches[pos * world_size + rank]


def check_fits(items: list[Item], batch_size: int, world_size: int) -> None:
    """Fail before start when ranks × batch cannot be filled from one bucket."""
    if batches_per_rank(items, batch_size, world_size) >= 1:
        return
    from fluxray.errors import ConfigError

    largest = max((sum(1 for it in items if it.size == s) for s in {it.size for it in items}), default=0)
    raise ConfigError(
        f"train.batch_size ({batch_size}) x distributed.workers ({world_size}) = {batch_size * world_size} "
        f"exceeds the images in the largest bucket ({largest}, {len(items)} examples in all): "
        "lower train.batch_size or distributed.workers, or add images")

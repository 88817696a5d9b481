"""Batches across workers: every rank gets a distinct shard of each epoch, one optimizer step
takes micro-batch x workers x accumulation images, and a batch too big for the data fails early."""

import pytest

from fluxray.data.buckets import batches_per_rank, check_fits, epoch_batches, make_items, rank_batch
from fluxray.errors import ConfigError

# Three aspect buckets at 256 px: 12 square, 7 portrait, 5 landscape images.
SIZES = [(512, 512)] * 12 + [(384, 576)] * 7 + [(640, 400)] * 5


def _epoch_shards(items, batch_size, world, epoch):
    per_rank = batches_per_rank(items, batch_size, world)
    return [[rank_batch(items, batch_size, 0, world, r, epoch * per_rank + i) for i in range(per_rank)]
            for r in range(world)]


@pytest.mark.parametrize("batch_size,world", [(1, 2), (2, 3), (3, 2)])
def test_each_rank_sees_a_distinct_shard_of_every_epoch(batch_size, world):
    items = make_items(SIZES, [256])
    for epoch in range(3):
        shards = _epoch_shards(items, batch_size, world, epoch)
        seen = [[it for batch in shard for it in batch] for shard in shards]
        for batch in (b for shard in shards for b in shard):
            assert len(batch) == batch_size and len({it.size for it in batch}) == 1  # one bucket per batch
        flat = [it for s in seen for it in s]
        assert len(flat) == len(set(flat)), f"an image repeats within epoch {epoch}"
        assert all(len(s) == len(seen[0]) for s in seen)  # equal work, so the collectives line up
    # A new epoch deals a new order.
    assert _epoch_shards(items, 2, 3, 0) != _epoch_shards(items, 2, 3, 1)


def test_one_optimizer_step_takes_micro_batch_times_workers_times_accumulation():
    items = make_items(SIZES, [256])
    batch_size, world, accum = 2, 2, 2
    for step in range(2):
        images = [it for r in range(world) for micro in range(accum)
                  for it in rank_batch(items, batch_size, 0, world, r, step * accum + micro)]
        assert len(set(images)) == batch_size * world * accum


def test_batch_order_is_derived_so_a_resumed_run_draws_the_same():
    items = make_items(SIZES, [256])
    assert rank_batch(items, 2, 7, 3, 1, 11) == rank_batch(list(items), 2, 7, 3, 1, 11)
    assert epoch_batches(items, 2, 7, 0) != epoch_batches(items, 2, 8, 0)


def test_workers_times_batch_beyond_the_data_fails_with_what_to_change():
    items = make_items([(256, 256)] * 18, [64])  # the bundled sample set at 64 px
    check_fits(items, batch_size=2, world_size=9)
    with pytest.raises(ConfigError) as err:
        check_fits(items, batch_size=2, world_size=10)
    msg = str(err.value)
    assert "train.batch_size (2) x distributed.workers (10) = 20" in msg
    assert "largest bucket (18" in msg and "lower train.batch_size or distributed.workers" in msg


def test_a_job_too_wide_for_its_dataset_fails_before_any_worker_starts(tiny_config):
    from fluxray.train.job import run_job

    cfg = tiny_config("distributed.workers=10", "train.batch_size=2")
    with pytest.raises(ConfigError, match=r"distributed.workers \(10\) = 20 exceeds"):
        run_job(cfg)
    assert not (cfg.storage_root / "runs").exists()  # nothing recorded, no MLflow run, no Ray

"""Gradient buckets (chapter 4.1): which tensors share an all-reduce, and the bucket size.

Pure bookkeeping, tested without processes."""
import functools

import pytest
import torch

from nanopar import models
from nanopar.buckets import assign_buckets, bucket_cap_bytes
from nanopar.data_parallel import BucketedDataParallel
from nanopar.training import TrainConfig

MLP = functools.partial(models.mlp, 32, 3, in_features=12, out_features=5)


def test_buckets_fill_in_order_up_to_the_cap():
    assert assign_buckets([4, 4, 4, 10, 1], cap_bytes=8) == [[0, 1], [2], [3], [4]]
    assert assign_buckets([1, 1, 1], cap_bytes=100) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="cap_bytes must be positive, got 0"):
        assign_buckets([1], 0)


def test_a_zero_size_tensor_first_in_line_joins_the_first_bucket():
    assert assign_buckets([0, 4, 4, 4], cap_bytes=8) == [[0, 1, 2], [3]]
    assert assign_buckets([0, 0], cap_bytes=8) == [[0, 1]]


def test_only_tensors_with_the_same_key_share_a_bucket():
    f32, f64 = (torch.float32, "cpu"), (torch.float64, "cpu")
    # Each key fills its own open bucket; buckets are listed by their first tensor.
    assert assign_buckets([4, 8, 4, 8, 4], cap_bytes=8, keys=[f32, f64, f32, f64, f32]) == [[0, 2], [1], [3], [4]]
    with pytest.raises(ValueError, match="2 keys for 3 tensors"):
        assign_buckets([1, 1, 1], 8, keys=[f32, f32])


def test_bucket_cap_mb_counts_mebibytes_as_ddp():
    assert bucket_cap_bytes(25) == 25 * 2**20
    assert bucket_cap_bytes(1e-6) == 1


@pytest.mark.parametrize("bucket_cap_mb, error, message", [
    (1e-9, ValueError, r"bucket_cap_mb=1e-09 is 0 bytes; use at least 9\.5e-07"),
    (0, ValueError, "must be a positive, finite number of megabytes.*got 0"),
    (-1, ValueError, "must be a positive, finite number of megabytes.*got -1"),
    (float("inf"), ValueError, "must be a positive, finite number"),
    (float("nan"), ValueError, "must be a positive, finite number"),
    ("25", TypeError, "must be a number of megabytes.*got str '25'"),
    (True, TypeError, "got bool True"),
])
def test_a_bad_bucket_size_is_refused_with_a_message_about_it(bucket_cap_mb, error, message):
    with pytest.raises(error, match=message):
        bucket_cap_bytes(bucket_cap_mb)
    # Before any communication: the wrapper and the config refuse it in the caller's process.
    with pytest.raises(error, match=message):
        BucketedDataParallel(MLP(), bucket_cap_mb=bucket_cap_mb)
    with pytest.raises(error, match=message):
        TrainConfig(bucket_cap_mb=bucket_cap_mb)

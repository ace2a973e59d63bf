"""Data parallelism over sequences of uneven length: which samples meet in a batch (chapter 5.3).

A data-parallel step pads each rank's sequences to the longest one it holds, and then
waits, in the gradient all-reduce, for the rank whose padded batch took longest. How the
global batches are formed decides both costs:

* :func:`random_batches`: shuffle, cut into global batches of B, deal B/N to each rank
  (the baseline; a long utterance anywhere makes its rank pad and the others wait);
* :func:`length_bucketed_batches`: shuffle, sort by length within large chunks, cut
  those into global batches (similar lengths together), shuffle the batches; optionally
  split each batch over the ranks so that their padded frame counts match;
* :func:`padding_stats`: real and padded frames per rank per step, for any such plan.

A *plan* is one epoch: ``plan[step][rank]`` lists the sample indices rank ``rank`` gets at
that step. Every sample is in it exactly once (the last global batch may be smaller).

Which samples meet must not change the gradient of a batch, and padding must not either:
:func:`collate` pads and builds a mask, :func:`frame_loss` sums the real frames' losses
and divides by the global frame count over N, so that averaging the ranks' gradients
gives the single-process gradient of the mean over every real frame of the global batch,
however the frames are spread over the ranks (:func:`dp_step_gradients` against
:func:`single_step_gradients`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .launch import RankContext
from .training import TrainConfig, wrap

Plan = list[list[list[int]]]  # plan[step][rank] -> sample indices
Sample = tuple[torch.Tensor, torch.Tensor]  # features (frames, features), targets (frames,)


def synthetic_lengths(n: int, seed: int = 0, frames_per_second: float = 100.0, median_s: float = 4.0,
                      sigma: float = 0.7, min_s: float = 0.5, max_s: float = 30.0) -> list[int]:
    """Frame counts of ``n`` speech-like utterances (chapter 5.3).

    Durations are log-normal (median ``median_s`` seconds, log-space spread ``sigma``),
    clipped to ``min_s`` … ``max_s`` and turned into frames at ``frames_per_second``
    (100: the usual 10 ms hop of filterbank features; 25 after a 4× subsampling front end).
    This models the shape of read and conversational corpora (most utterances a few
    seconds, a long tail to tens of seconds); it is not fitted to any one corpus.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 utterance, got {n}")
    if not 0 < min_s <= median_s <= max_s or sigma < 0 or frames_per_second <= 0:
        raise ValueError(f"need 0 < min_s <= median_s <= max_s, sigma >= 0 and frames_per_second > 0, got "
                         f"min_s={min_s}, median_s={median_s}, max_s={max_s}, sigma={sigma}, "
                         f"frames_per_second={frames_per_second}")
    g = torch.Generator().manual_seed(seed)
    seconds = (math.log(median_s) + sigma * torch.randn(n, generator=g, dtype=torch.float64)).exp()
    frames = (seconds.clamp(min_s, max_s) * frames_per_second).round().clamp(min=1)
    return [int(f) for f in frames]


def synthetic_frames(lengths: Sequence[int], features: int, classes: int, seed: int = 0) -> list[Sample]:
    """Random features and per-frame targets (frame classification, as hybrid acoustic
    models are trained) for utterances of these lengths: enough to check and time a step."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(t, features, generator=g), torch.randint(0, classes, (t,), generator=g)) for t in lengths]


def random_batches(lengths: Sequence[int], batch: int, ranks: int, seed: int = 0,
                   drop_last: bool = False) -> Plan:
    """The baseline plan: shuffled samples, B = ``batch`` per step, B/N per rank (chapter 5.3)."""
    order = _shuffled(lengths, batch, ranks, seed)
    return [_deal(b, ranks) for b in _cut(order, batch, ranks, drop_last)]


def length_bucketed_batches(lengths: Sequence[int], batch: int, ranks: int, seed: int = 0,
                            chunk_batches: int = 32, balance_tokens: bool = False,
                            drop_last: bool = False) -> Plan:
    """Global batches of similar lengths, in shuffled order (chapter 5.3).

    The shuffled samples are taken ``chunk_batches`` global batches at a time; each chunk
    is sorted by length and cut into global batches, and the batches of the whole epoch
    are shuffled (a smaller last batch stays last), so that neither the chunks nor a
    length curriculum show in training order. Larger chunks pad less and mix less (a chunk of the whole epoch sorts it).
    With ``balance_tokens``, each rank gets a run of the sorted batch chosen so that the
    ranks' padded frame counts (samples × longest) are as even as possible: ranks then
    hold different numbers of samples, which :func:`frame_loss` accounts for.
    """
    if chunk_batches < 1:
        raise ValueError(f"chunk_batches must be at least 1 global batch, got {chunk_batches}")
    order = _shuffled(lengths, batch, ranks, seed)
    chunk = chunk_batches * batch
    by_length = [i for c in range(0, len(order), chunk) for i in sorted(order[c:c + chunk], key=lambda i: lengths[i])]
    batches = _cut(by_length, batch, ranks, drop_last)
    whole = len(batches) - (len(batches[-1]) < batch)  # a smaller last batch stays last
    g = torch.Generator().manual_seed(seed + 1)  # another stream than the samples' shuffle
    batches = [batches[k] for k in torch.randperm(whole, generator=g).tolist()] + batches[whole:]
    if balance_tokens:
        return [_balanced_deal(b, [lengths[i] for i in b], ranks) for b in batches]
    return [_deal(b, ranks) for b in batches]


def _shuffled(lengths: Sequence[int], batch: int, ranks: int, seed: int) -> list[int]:
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if batch < ranks or batch % ranks:
        raise ValueError(f"a global batch of {batch} does not split over {ranks} ranks: use a multiple of {ranks}")
    if len(lengths) < batch:
        raise ValueError(f"{len(lengths)} samples are fewer than one global batch of {batch}: lower the batch")
    if any(t < 1 for t in lengths):
        raise ValueError(f"every length must be at least 1 frame, got {min(lengths)}")
    return torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()


def _cut(order: list[int], batch: int, ranks: int, drop_last: bool) -> list[list[int]]:
    batches = [order[k:k + batch] for k in range(0, len(order), batch)]
    tail = len(batches[-1])
    if tail < batch and drop_last:
        batches.pop()
    elif tail < ranks:
        raise ValueError(f"the last global batch would hold {tail} samples for {ranks} ranks: pass "
                         f"drop_last=True to drop it, or pick a batch that leaves at least {ranks}")
    return batches


def _deal(batch: list[int], ranks: int) -> list[list[int]]:
    # Runs of equal size (the smaller last batch: sizes differ by at most one).
    q, r = divmod(len(batch), ranks)
    starts = [k * q + min(k, r) for k in range(ranks + 1)]
    return [batch[a:b] for a, b in zip(starts, starts[1:])]


def _balanced_deal(batch: list[int], lengths: list[int], ranks: int) -> list[list[int]]:
    """Split a batch into ``ranks`` runs of its length order, minimising the largest padded count."""
    order = sorted(range(len(batch)), key=lambda k: lengths[k])
    sorted_lengths = [lengths[k] for k in order]

    def runs(budget: int) -> list[int] | None:  # run sizes, longest run first, or None if over budget
        sizes, end = [], len(order)
        for left in range(ranks - 1, -1, -1):  # every later rank needs at least one sample
            take = min(budget // sorted_lengths[end - 1], end - left)
            if take < 1:
                return None
            sizes.append(take)
            end -= take
        return sizes if end == 0 else None

    low, high = sorted_lengths[-1], len(order) * sorted_lengths[-1]  # the answer lies in low … high
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if runs(mid) else (mid + 1, high)
    end, dealt = len(order), []
    for take in runs(low):
        dealt.append([batch[k] for k in order[end - take:end]])
        end -= take
    return dealt[::-1]  # rank 0 the shortest run


@dataclass(frozen=True)
class PaddingStats:
    """Frames per step and rank: ``real`` (the utterances) and ``padded`` (samples × longest)."""

    real: list[list[int]]
    padded: list[list[int]]

    @property
    def padding_fraction(self) -> float:
        """Share of the padded frames that are padding."""
        padded = sum(map(sum, self.padded))
        return (padded - sum(map(sum, self.real))) / padded

    @property
    def slowest_frames(self) -> int:
        """The slowest rank's padded frames, summed over the steps: what the epoch's time follows."""
        return sum(max(p) for p in self.padded)

    @property
    def idle_fraction(self) -> float:
        """Share of the ranks' time spent waiting for the slowest rank, if time ∝ padded frames."""
        everyone = sum(max(p) * len(p) for p in self.padded)
        return (everyone - sum(map(sum, self.padded))) / everyone


def padding_stats(plan: Plan, lengths: Sequence[int]) -> PaddingStats:
    """Real and padded frames of every rank at every step of ``plan`` (chapter 5.3)."""
    real = [[sum(lengths[i] for i in share) for share in step] for step in plan]
    padded = [[len(share) * max((lengths[i] for i in share), default=0) for share in step] for step in plan]
    return PaddingStats(real, padded)


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features padded with zeros to the longest sample, targets, and the mask of real frames (chapter 5.3)."""
    if not samples:
        raise ValueError("collate needs at least one sample: every rank must get one at every step")
    longest = max(x.shape[0] for x, _ in samples)
    x = torch.zeros(len(samples), longest, samples[0][0].shape[1], dtype=samples[0][0].dtype)
    y = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for k, (xs, ys) in enumerate(samples):
        x[k, :len(xs)], y[k, :len(ys)], mask[k, :len(xs)] = xs, ys, True
    return x, y, mask


def frame_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, global_frames: int,
               ranks: int = 1) -> torch.Tensor:
    """Cross-entropy summed over real frames, divided by ``global_frames / ranks`` (chapter 5.3).

    Averaging the N ranks' gradients of this loss gives the gradient of the mean over all
    ``global_frames`` real frames of the global batch; a per-rank mean would weight each
    rank's frames by how few of them it holds.
    """
    per_frame = F.cross_entropy(logits[mask], targets[mask], reduction="sum")
    return per_frame * ranks / global_frames


def backward_on_share(model: nn.Module, samples: Sequence[Sample], global_frames: int, ranks: int,
                      device: torch.device | str = "cpu") -> float:
    """Pad this rank's samples, run forward and backward of :func:`frame_loss`; return the loss.

    ``model(x, mask)`` maps padded features (batch, frames, features) to per-frame logits.
    Book: chapter 5.3.
    """
    x, y, mask = (t.to(device) for t in collate(samples))
    loss = frame_loss(model(x, mask), y, mask, global_frames, ranks)
    loss.backward()
    return loss.item()


def dp_step_gradients(ctx: RankContext, build: Callable[[], nn.Module], shares: Sequence[Sequence[Sample]],
                      impl: str = "bucketed", group=None) -> dict[str, torch.Tensor]:
    """Worker: one data-parallel backward on ``shares[rank]`` (padded to its own longest),
    the gradient averaged over ``group``; returns it (chapter 5.3)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if len(shares) != size:
        raise ValueError(f"got {len(shares)} shares of the batch for {size} ranks: pass one per rank")
    model, sync = wrap(build().to(ctx.device), TrainConfig(impl=impl), group)
    global_frames = sum(len(y) for share in shares for _, y in share)
    backward_on_share(model, shares[rank], global_frames, size, ctx.device)
    sync()
    return {n: p.grad.cpu() for n, p in model.module.named_parameters()}


def single_step_gradients(build: Callable[[], nn.Module], samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """The reference: the whole global batch in one process, padded to its longest (chapter 5.3)."""
    model = build()
    backward_on_share(model, samples, sum(len(y) for _, y in samples), 1)
    return {n: p.grad for n, p in model.named_parameters()}

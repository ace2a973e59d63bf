"""nanopar.comm: the ring all-reduce equals dist.all_reduce; the primer's values by hand."""
import pytest
import torch

from nanopar import comm, devices
from nanopar.launch import run

SIZES = [1, 2, 3, 5, 7, 1000, 1001, 4097]  # includes sizes below and not divisible by N


def ring_vs_all_reduce_many(ctx, sizes, dtype):
    return [comm.ring_vs_all_reduce(ctx, n, dtype=dtype, seed=n) for n in sizes]


def ring_on_non_contiguous(ctx):
    comm.ring_all_reduce(torch.zeros(4, 4).t())


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_equals_all_reduce(world_size):
    per_rank = run(ring_vs_all_reduce_many, world_size, SIZES, "float32", timeout=120, backend="gloo")
    for rank_results in per_rank:
        for res in rank_results:
            torch.testing.assert_close(res["ring"], res["all_reduce"])
    # and both are the sum of the inputs of all ranks
    for i in range(len(SIZES)):
        total = sum(r[i]["input"] for r in per_rank)
        torch.testing.assert_close(per_rank[0][i]["ring"], total)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_is_exact_on_integers(world_size):
    # Exact, so any element lost or added twice shows: sizes not divisible by N, 1 and 3 < 4
    # (empty chunks), and 2**18 + 3 elements (2 MiB) through every step of the schedule.
    sizes = [1, 3, 10, 101, 4097, 2**18 + 3]
    per_rank = run(ring_vs_all_reduce_many, world_size, sizes, "int64", timeout=120, backend="gloo")
    for i in range(len(sizes)):
        total = sum(r[i]["input"] for r in per_rank)
        for rank_results in per_rank:
            assert torch.equal(rank_results[i]["ring"], rank_results[i]["all_reduce"])
            assert torch.equal(rank_results[i]["ring"], total)


def test_ring_refuses_non_contiguous_tensors():
    with pytest.raises(Exception, match="contiguous"):
        run(ring_on_non_contiguous, 2, timeout=60, backend="gloo")


@pytest.mark.parametrize("numel, n", [(10, 3), (3, 4), (0, 2), (8, 4)])
def test_ring_chunks_cover_the_tensor(numel, n):
    chunks = comm.ring_chunks(numel, n)
    assert len(chunks) == n and sum(k for _, k in chunks) == numel
    assert max(k for _, k in chunks) - min(k for _, k in chunks) <= 1
    assert all(s == sum(k for _, k in chunks[:i]) for i, (s, _) in enumerate(chunks))


def test_primer_values_by_hand():
    seen = run(comm.collectives_primer, 4, backend="gloo")
    mine = [[10.0 * (r + 1) + i for i in range(4)] for r in range(4)]
    sums = [sum(col) for col in zip(*mine)]  # [100, 104, 108, 112]
    for r, s in enumerate(seen):
        assert s["broadcast"]["after"] == mine[0]
        assert s["all_reduce"]["after"] == sums
        assert s["all_gather"]["after"] == [10.0, 20.0, 30.0, 40.0]
        assert s["reduce_scatter"]["after"] == [sums[r]]
        assert s["send_recv"]["after"] == [10.0 * ((r - 1) % 4 + 1)]


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_ring_schedule_sums_every_chunk_on_every_rank(n):
    # Play the schedule with sets of contributions instead of tensors: after the
    # reduce-scatter, rank r's chunk r+1 holds everyone's; after the all-gather, all do.
    held = [[{r} for _ in range(n)] for r in range(n)]
    for phase, step, send, recv in comm.ring_schedule(n):
        sent = [set(held[r][(send + r) % n]) for r in range(n)]
        for r in range(n):
            incoming, c = sent[(r - 1) % n], (recv + r) % n
            held[r][c] = held[r][c] | incoming if phase == "reduce-scatter" else incoming
        if phase == "reduce-scatter" and step == n - 2:
            assert all(held[r][(r + 1) % n] == set(range(n)) for r in range(n))
    assert all(chunk == set(range(n)) for rank in held for chunk in rank)


@pytest.mark.skipif(devices.gpu_count() < 2, reason="needs two GPUs: the chapter 2 workers under NCCL")
def test_the_chapter_2_workers_run_on_nccl():
    # On a multi-GPU machine the notebooks' "auto" picks NCCL, which has no CPU tensors.
    seen = run(comm.collectives_primer, 2, backend="nccl", timeout=120)
    assert [s["all_reduce"]["after"] for s in seen] == [[30.0, 32.0]] * 2
    for res in run(ring_vs_all_reduce_many, 2, [5, 4097], "int64", backend="nccl", timeout=120)[0]:
        assert torch.equal(res["ring"], res["all_reduce"])

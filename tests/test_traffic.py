"""nanopar.bench.traffic: bytes counted at the collectives, by group; everything restored after."""
import pytest
import torch
import torch.distributed as dist

from nanopar import comm, p2p
from nanopar.bench import traffic as tr
from nanopar.launch import run


def collectives_in_groups(ctx):
    r = ctx.rank
    pairs = {"a": [dist.new_group(m) for m in ([0, 1], [2, 3])], "b": [dist.new_group(m) for m in ([0, 2], [1, 3])]}
    alone = [dist.new_group([i]) for i in range(4)][r]
    a, b = pairs["a"][r // 2], pairs["b"][r % 2]
    out = {}
    with tr.count_traffic({a: "a", b: "b", alone: "alone"}) as traffic:
        t = torch.full((10,), float(r))
        dist.all_reduce(t, group=a)  # 40 bytes on every rank of a
        out["all_reduce"] = t.tolist()
        dist.all_reduce(torch.ones(3), group=None, async_op=True).wait()  # world: 12 bytes each
        dist.all_reduce(torch.ones(100), group=alone)  # a group of one moves nothing
        gathered = torch.empty(6)
        comm.all_gather_single(gathered, torch.full((3,), float(r)), group=b)  # 12 bytes
        out["all_gather"] = gathered.tolist()
        part = torch.empty(4, dtype=torch.float64)
        comm.reduce_scatter_single(part, torch.ones(8, dtype=torch.float64), group=a)  # 64 bytes
        out["reduce_scatter"] = part.tolist()
        src = torch.arange(5) if r == 1 else torch.empty(5, dtype=torch.int64)
        dist.broadcast(src, src=1)  # 40 bytes, counted on rank 1 only
        out["broadcast"] = src.tolist()
        got = torch.empty(6)
        if r < 2:  # rank 0 → 2 and 1 → 3 in group b: 24 bytes each, then 10 int64 header + 24
            p2p.wait_all(p2p.send(torch.full((6,), float(r)), comm.global_rank(b, 1), b))
            p2p.wait_all(p2p.send(torch.full((6,), float(r)), comm.global_rank(b, 1), b, with_header=True))
        else:
            dist.recv(got, comm.global_rank(b, 0), group=b)
            got = p2p.recv_with_header(comm.global_rank(b, 0), torch.device("cpu"), b)
        out["recv"] = got.tolist()
        ring = torch.full((7,), float(r))
        comm.ring_all_reduce(ring, group=a)  # batch_isend_irecv: 2(N−1) sends of chunks of 4 + 3 (N = 2): 28
        out["ring"] = ring.tolist()
    return {"payload": traffic.payload(), "calls": traffic.calls(), "wire": traffic.wire_bytes(), "out": out}


def test_collectives_in_groups_count_exactly_what_they_hand_over():
    res = run(collectives_in_groups, 4, backend="gloo", timeout=120)
    for r, got in enumerate(res):
        first = r // 2 * 2  # the results are right: counting changes nothing
        assert got["out"]["all_reduce"] == [float(first + first + 1)] * 10
        assert got["out"]["all_gather"] == [float(r % 2)] * 3 + [float(r % 2 + 2)] * 3
        assert got["out"]["reduce_scatter"] == [2.0] * 4
        assert got["out"]["broadcast"] == [0, 1, 2, 3, 4]
        assert got["out"]["ring"] == [float(first + first + 1)] * 7
        if r >= 2:
            assert got["out"]["recv"] == [float(r - 2)] * 6
        sends = (24 + 80 + 24) if r < 2 else 0
        assert got["payload"] == {"a": 40 + 64 + 28, "b": 12 + sends, "world": 12 + (40 if r == 1 else 0)}
        assert got["calls"] == {"a": 4, "b": 1 + (3 if r < 2 else 0), "world": 1 + (r == 1)}
        # ring factors: all-reduce 2(N−1)/N, reduce-scatter (N−1)/N, all-gather N−1, broadcast N−1
        assert got["wire"] == pytest.approx({"a": 40 * 1 + 64 * 0.5 + 28, "b": 12 * 1 + sends,
                                             "world": 12 * 1.5 + (40 * 3 if r == 1 else 0)})


def _wrapped_names():
    return [getattr(dist, n) for n in (*tr._COUNTED, "batch_isend_irecv", "P2POp")] + [comm._all_gather_single]


def test_functions_are_restored_after_the_block_even_on_error():
    before = _wrapped_names()
    with pytest.raises(KeyError, match="inside"):
        with tr.count_traffic({}):
            assert dist.all_reduce is not before[0] and comm._all_gather_single is not before[-1]
            raise KeyError("inside")
    assert all(a is b for a, b in zip(_wrapped_names(), before))
    with tr.count_traffic({}):  # and a new counter can start
        with pytest.raises(RuntimeError, match="already counting"):
            with tr.count_traffic({}):
                pass
    assert all(a is b for a, b in zip(_wrapped_names(), before))

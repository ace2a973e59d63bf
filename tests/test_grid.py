"""The grid of chapter 3.3: pure topology without processes, then process groups and DeviceMesh on gloo ranks."""
import itertools

import pytest
import torch
import torch.distributed as dist

from nanopar import launch
from nanopar.grid import AXES, Coords, Grid, Topology

ORDERS = list(itertools.permutations(AXES))
SHAPES = [(2, 2, 2), (4, 1, 1), (1, 4, 1), (1, 1, 4), (2, 1, 3), (3, 2, 1), (1, 1, 1)]


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
@pytest.mark.parametrize("dp,pp,tp", SHAPES)
def test_ranks_and_coordinates_are_a_bijection_and_groups_vary_one_axis(dp, pp, tp, order):
    topo = Topology(dp, pp, tp, order)
    coords = [topo.coords(r) for r in range(topo.world_size)]
    assert sorted(coords) == sorted(Coords(*c) for c in itertools.product(range(dp), range(pp), range(tp)))
    assert [topo.rank(*c) for c in coords] == list(range(topo.world_size))
    for axis in AXES:
        groups = topo.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(topo.world_size))  # a partition
        assert len(groups) == topo.world_size // topo.degree(axis)
        for g in groups:
            assert [getattr(topo.coords(r), axis) for r in g] == list(range(topo.degree(axis)))
            for other in set(AXES) - {axis}:  # members agree on every other coordinate
                assert len({getattr(topo.coords(r), other) for r in g}) == 1
            assert all(topo.group_of(r, axis) == g for r in g)
    # The innermost axis varies fastest: its groups are runs of consecutive ranks.
    inner = order[-1]
    for g in topo.groups(inner):
        assert list(g) == list(range(g[0], g[0] + len(g)))


def test_default_order_keeps_tensor_parallel_groups_on_consecutive_ranks():
    topo = Topology(dp=2, pp=2, tp=2)
    assert topo.order == ("pp", "dp", "tp")
    assert topo.groups("tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert topo.groups("dp") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert topo.groups("pp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert topo.coords(5) == Coords(dp=0, pp=1, tp=1)
    assert topo.mesh() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_bad_degrees_and_orders_are_clear_errors():
    with pytest.raises(ValueError, match=r"2 × 2 × 2 = 8 ranks, but the world has 6"):
        Topology(2, 2, 2).check_world(6)
    with pytest.raises(ValueError, match="does not divide the world size 6"):
        Topology.for_world(6, pp=4)
    assert Topology.for_world(8, pp=2, tp=2).dp == 2
    with pytest.raises(ValueError, match="degree of tp must be a positive integer"):
        Topology(2, 1, 0)
    with pytest.raises(ValueError, match="order must list each of"):
        Topology(order=("dp", "dp", "tp"))
    with pytest.raises(ValueError, match="unknown axis 'sp'"):
        Topology().groups("sp")
    with pytest.raises(ValueError, match="rank 8 is outside the grid of 8 ranks"):
        Topology(2, 2, 2).coords(8)


def _groups_and_mesh(ctx, degrees, order):
    """Worker: two grids in one process; each group's members, an all-reduce in it, and DeviceMesh's groups."""
    grids = [Grid(Topology(*degrees, order)), Grid(Topology(ctx.world_size, 1, 1))]
    out = {}
    for i, grid in enumerate(grids):
        for axis in AXES:
            group = grid.group(axis)
            t = torch.tensor([float(ctx.rank)])
            dist.all_reduce(t, group=group)
            out[i, axis] = (dist.get_process_group_ranks(group), grid.members(axis), t.item(),
                            dist.get_rank(group), grid.index(axis))
    mesh = grids[0].device_mesh("cpu")
    out["mesh"] = {axis: dist.get_process_group_ranks(mesh.get_group(axis)) for axis in AXES}
    return out


@pytest.mark.parametrize("order", [("pp", "dp", "tp"), ("tp", "pp", "dp")], ids="-".join)
def test_process_groups_and_device_mesh_have_the_topologys_members(order):
    topo = Topology(2, 2, 2, order)
    results = launch.run(_groups_and_mesh, 8, (2, 2, 2), order, backend="gloo", timeout=120)
    for rank, out in enumerate(results):
        for axis in AXES:
            members = list(topo.group_of(rank, axis))
            ranks, listed, total, group_rank, index = out[0, axis]
            assert ranks == members and list(listed) == members
            assert total == sum(members)  # the all-reduce ran inside exactly that group
            assert group_rank == index == getattr(topo.coords(rank), axis)
            assert out["mesh"][axis] == members
        # The second grid in the same process: data parallelism over the whole world.
        assert out[1, "dp"][0] == list(range(8)) and out[1, "tp"][0] == [rank]

"""Sharded embedding tables (chapter 5.4): table-wise and row-wise sharding of a DLRM's tables
equal the unsharded model, use the memory their shards should, send the bytes the exchange
needs, reject bad input on every rank at once, and agree with DTensor's RowwiseParallel."""
import functools

import pytest
import torch
from torch import nn

from nanopar import plotting, recsys
from nanopar.embedding_sharding import (
    EmbeddingBags,
    ShardedEmbeddingBags,
    bag_lengths,
    place_tables,
    row_ranges,
)
from nanopar.launch import run

DIM, GLOBAL_BATCH, STEPS, INT64 = 8, 16, 3, 8


def _build(rows, modes):
    return functools.partial(recsys.dlrm, 6, rows, DIM, modes=modes)


# (world size, global ranks of the group or None, table rows, pooling modes, SGD momentum)
CASES = {
    "2 ranks": (2, None, (50, 30, 7, 20, 5), ("sum", "mean", "sum", "mean", "sum"), 0.0),
    # 3 tables on 4 ranks: table-wise, one rank owns none and still joins every exchange.
    "4 ranks": (4, None, (50, 30, 7), ("mean", "sum", "sum"), 0.0),
    "sub-group without rank 0, momentum": (3, [1, 2], (50, 30, 7, 20, 5), "sum", 0.9),
}


@pytest.mark.parametrize("case", CASES)
def test_sharded_model_equals_the_unsharded_model(case):
    world, group_ranks, rows, modes, momentum = CASES[case]
    build, data = _build(rows, modes), recsys.make_click_data(STEPS * GLOBAL_BATCH, 6, rows, seed=1)
    ref = recsys.train_unsharded(build, data, GLOBAL_BATCH, STEPS, momentum=momentum)
    per_rank = run(recsys.train_sharded, world, build, data, GLOBAL_BATCH, STEPS,
                   kwargs={"group_ranks": group_ranks, "momentum": momentum}, backend="gloo", timeout=120)
    if group_ranks:
        assert [r is None for r in per_rank] == [rank not in group_ranks for rank in range(world)]
    per_rank = [r for r in per_rank if r is not None]
    n = len(per_rank)
    for scheme in ("table", "row"):
        results = [r[scheme] for r in per_rank]
        torch.testing.assert_close(torch.cat([r["logits"] for r in results]), ref["logits"])
        # each rank's loss is the mean over its samples; the global batch's loss is their mean
        torch.testing.assert_close(torch.tensor([r["losses"] for r in results]).mean(0),
                                   torch.tensor(ref["losses"]), check_dtype=False)
        held = [set() for _ in rows]
        for r in results:
            for key in ("first_step", "final"):  # gradients of step 1; parameters after the last step
                _assert_same(r[key], ref[key])
            for t, (start, w) in r["final"]["tables"].items():
                held[t].update(range(start, start + len(w)))
            _assert_memory(r["memory"], r["final"], ref["final"], momentum)
        assert held == [set(range(k)) for k in rows], f"{scheme}: every row of every table is held somewhere"
        if scheme == "row":
            assert all(len(r["final"]["tables"]) == len(rows) for r in results)
        _assert_bytes_sent(scheme, results, data.slice(0, GLOBAL_BATCH), rows, n)
        # the notebook's one-number summary of all the above, and that it notices one wrong value
        assert recsys.largest_difference(results, ref) < 1e-5
        next(iter(results[0]["final"]["tables"].values()))[1][0, 0] += 1.0
        assert recsys.largest_difference(results, ref) > 0.99


def _assert_same(sharded, unsharded):
    for kind in ("dense", "dense_grads"):
        assert sharded[kind].keys() == unsharded[kind].keys()
        for name, value in sharded[kind].items():
            torch.testing.assert_close(value, unsharded[kind][name], msg=f"{kind} {name}")
    for kind in ("tables", "table_grads"):
        for t, (start, value) in sharded[kind].items():
            torch.testing.assert_close(value, unsharded[kind][t][1][start:start + len(value)], msg=f"{kind} {t}")


def _assert_memory(memory, sharded, unsharded, momentum):
    # Expected from the shards' shapes: rows held × D × 4 bytes; the MLPs are replicated.
    shard_bytes = sum(w.numel() * 4 for _, w in sharded["tables"].values())
    dense_bytes = sum(p.numel() * 4 for p in unsharded["dense"].values())
    assert memory["embeddings"] == shard_bytes and memory["dense"] == dense_bytes
    assert memory["optimizer"] == (shard_bytes + dense_bytes if momentum else 0)


def _assert_bytes_sent(scheme, results, batch, rows, n):
    """The bytes counted by the module are those of the tensors the exchange needs, derived here anew."""
    b, T = GLOBAL_BATCH // n, len(rows)
    owner = place_tables([k * DIM * 4 for k in rows], n)
    row = DIM * 4  # one pooled vector, or its gradient
    for me, r in enumerate(results):
        mine = batch.slice(me * b, (me + 1) * b)
        header = (n - 1) * 3 * INT64
        if scheme == "table":
            owned = owner.count(me)
            ids = sum(b + len(ids) for t, (ids, _) in enumerate(mine.sparse) if owner[t] != me)
            expected = {"pooled": owned * (n - 1) * b * row, "gradients": (T - owned) * b * row}
        else:
            ids = sum((n - 1) * b + int(((ids < start) | (ids >= stop)).sum())
                      for (ids, _), k in zip(mine.sparse, rows) for start, stop in [row_ranges(k, n)[me]])
            expected = {"pooled": (n - 1) * b * T * row, "gradients": (n - 1) * b * T * row}
        assert r["sent_bytes"] == {"ids": header + ids * INT64, **expected}


def test_table_placement_balances_bytes():
    # Largest first, each to the least-loaded rank: 70 | 50+20 | 40+30 (ties go to the lower rank)
    assert place_tables([40, 70, 20, 50, 30], 3) == [2, 0, 1, 1, 2]
    assert place_tables([10, 10, 10], 4) == [0, 1, 2]  # more ranks than tables: rank 3 owns none


def test_row_ranges_are_even_and_cover_the_table():
    assert row_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="3 rows cannot be sharded row-wise over 4 ranks.*table-wise"):
        row_ranges(3, 4)


@pytest.mark.parametrize("tables, message", [
    ([nn.EmbeddingBag(10, 4, mode="max")], "mode='max'"),
    ([nn.EmbeddingBag(10, 4), nn.EmbeddingBag(10, 5)], "table 1 has dimension 5, table 0 has 4"),
    ([nn.EmbeddingBag(10, 4, padding_idx=0)], r"\['padding_idx'\]"),
    ([nn.Embedding(10, 4)], "pass nn.EmbeddingBag"),
    ([], "no tables"),
])
def test_unsupported_tables_are_rejected_before_any_communication(tables, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ShardedEmbeddingBags(tables, "row")  # no process group needed: checked first
    with pytest.raises(ValueError, match="scheme must be one of"):
        ShardedEmbeddingBags([nn.EmbeddingBag(10, 4)], "column")


@pytest.mark.parametrize("sparse, message", [
    ([(torch.tensor([0, 10]), torch.tensor([0]))], "table 0 has 10 rows but got id 10: ids must lie in 0 … 9"),
    ([(torch.tensor([-1]), torch.tensor([0]))], "got id -1"),
    ([(torch.tensor([0, 1]), torch.tensor([1]))], "offsets must start at 0"),
    ([(torch.tensor([[0, 1]]), torch.tensor([0]))], "1-D integer tensors"),
    ([], "got bags for 0 tables, the model has 1"),
])
def test_bad_bags_are_named(sparse, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingBags([nn.EmbeddingBag(10, 4)])(sparse)


def test_bad_input_on_one_rank_raises_on_every_rank_and_the_next_batch_works():
    messages = run(_bad_inputs, 2, backend="gloo", timeout=60)
    assert "table 1 has 5 rows but got id 7" in messages[1]["out of range"]
    assert "rank(s) [1] passed invalid sparse input" in messages[0]["out of range"]
    for m in messages:
        assert "same number of bags on every rank; ranks [0, 1] have [2, 3]" in m["uneven"]
        torch.testing.assert_close(m["after"], m["expected"])
        assert "a global batch of 3 does not split over 2 ranks: use a multiple of 2" in m["batch"]


def _bad_inputs(ctx):
    torch.manual_seed(0)
    tables = [nn.EmbeddingBag(8, 4), nn.EmbeddingBag(5, 4, mode="mean")]
    reference, sharded = EmbeddingBags(tables), ShardedEmbeddingBags(tables, "row")
    seen = {}
    bad_id = 7 if ctx.rank == 1 else 1
    for name, sparse in (("out of range", [(torch.tensor([0, 1]), torch.tensor([0, 1]))] + [
                             (torch.tensor([2, bad_id]), torch.tensor([0, 1]))]),
                         ("uneven", [(torch.arange(2 + ctx.rank), torch.arange(2 + ctx.rank))] * 2)):
        try:
            sharded(sparse)
            seen[name] = "no error"
        except ValueError as e:
            seen[name] = str(e)
    good = [(torch.tensor([7, 0, 3]), torch.tensor([0, 2])), (torch.tensor([4]), torch.tensor([0, 1]))]
    seen.update(after=sharded(good).detach(), expected=reference(good).detach())
    try:
        recsys.train_sharded(ctx, _build((8, 5), "sum"), recsys.make_click_data(6, 6, (8, 5)), global_batch=3, steps=1)
    except ValueError as e:
        seen["batch"] = str(e)
    return seen


def test_rowwise_sharding_matches_dtensor_rowwise_parallel():
    # PyTorch's row-wise engine (TorchRec, the production one, is not installed here).
    torch.manual_seed(0)
    weight, ids, lr = torch.randn(11, 4), torch.randint(0, 11, (6, 3)), 0.5
    per_rank = run(recsys.rowwise_vs_dtensor, 2, weight, ids, kwargs={"lr": lr}, backend="gloo", timeout=120)
    table = nn.EmbeddingBag.from_pretrained(weight.clone(), freeze=False, mode="sum")
    pooled = table(*recsys.fixed_bags(ids))
    (pooled * torch.linspace(-1, 1, 4)).sum().backward()
    for impl in ("ours", "dtensor"):
        torch.testing.assert_close(torch.cat([r["pooled"][impl] for r in per_rank]), pooled.detach())
    assert [r["rows"] for r in per_rank] == [(0, 6), (6, 11)]
    for r in per_rank:
        torch.testing.assert_close(r["dtensor_grad"], table.weight.grad)
        torch.testing.assert_close(r["ours_grad"], table.weight.grad[slice(*r["rows"])])
        torch.testing.assert_close(r["ours_weight"], r["dtensor_weight"][slice(*r["rows"])])
        torch.testing.assert_close(r["ours_weight"], (weight - lr * table.weight.grad)[slice(*r["rows"])])


def test_click_data_is_seeded_skewed_and_slices_into_the_same_bags():
    rows = (1000, 20)
    data, again = recsys.make_click_data(400, 4, rows, seed=3), recsys.make_click_data(400, 4, rows, seed=3)
    assert torch.equal(data.clicks, again.clicks) and torch.equal(data.sparse[0][0], again.sparse[0][0])
    assert not torch.equal(data.dense, recsys.make_click_data(400, 4, rows, seed=4).dense)
    assert 0.2 < data.clicks.mean() < 0.8
    ids = data.sparse[0][0]
    assert (ids < 100).float().mean() > 0.4  # the lowest tenth of the rows gets over 40% of the lookups
    tables = EmbeddingBags([nn.EmbeddingBag(k, 3) for k in rows])
    part = data.slice(100, 150)
    torch.testing.assert_close(tables(part.sparse), tables(data.sparse)[100:150])
    assert [len(bag_lengths(*bags)) for bags in part.sparse] == [50, 50]


def test_memory_plot_draws_each_layout_and_rank():
    rows = [{"layout": layout, "rank": r, "embeddings": e * 2**20, "dense": 2**20}
            for layout, per in (("unsharded", [8, 8]), ("row-wise", [4, 4])) for r, e in enumerate(per)]
    ax = plotting.plot_embedding_memory(rows).axes[0]
    heights = sorted(round(p.get_height()) for p in ax.patches)
    assert heights == [1, 1, 1, 1, 4, 4, 8, 8]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rank 0", "rank 1"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["unsharded", "MLPs", "row-wise"]

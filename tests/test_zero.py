"""ZeRO from scratch (chapter 6.5): every stage trains as one process does, holds the bytes of the
formulas and sends the bytes of theory; beside ZeroRedundancyOptimizer, FSDP2 and FSDP1's pitfall."""
import functools
import json
import warnings

import matplotlib
import pytest
import torch
import torch.distributed as dist
from torch import nn

from nanopar import cli, models, plotting, zero
from nanopar.bench import zero as bench_zero
from nanopar.bench.traffic import count_traffic
from nanopar.launch import RankError, run
from nanopar.sharding import split_batch
from nanopar.training import TrainConfig, seeded

# n_embd = 10 gives units (embedding, 2 blocks, head) of 210, 1330, 1330 and 150 elements:
# none pads at N = 2, both blocks pad at N = 3, every unit pads at N = 4.
CONFIG = models.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=10)
UNIT_SIZES = (210, 1330, 1330, 150)
BATCH, STEPS = 12, 3  # 12 splits over 2, 3 and 4 ranks
X = torch.randint(0, 13, (BATCH * STEPS, 8), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 13, (BATCH * STEPS, 8), generator=torch.Generator().manual_seed(2))
OPTIMIZERS = {"adam": functools.partial(torch.optim.Adam, lr=1e-2),
              "momentum": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
              "sgd": functools.partial(torch.optim.SGD, lr=0.1)}
# Adam divides by sqrt(v): where gradients are near zero, the summation order of N ranks moves a
# step by more than float rounding (seen: 4e-6). SGD with momentum is compared at float rounding.
TOLERANCE = {"adam": {"atol": 2e-5, "rtol": 1e-4}, "momentum": {}, "sgd": {}}
JOBS = [(stage, opt) for opt in ("adam", "momentum") for stage in zero.STAGES]
BUILD = functools.partial(seeded, functools.partial(models.gpt, CONFIG))


def _batches():
    return [(X[i * BATCH:(i + 1) * BATCH], Y[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def _reference(opt: str) -> dict[str, torch.Tensor]:
    net = BUILD()
    optimizer = OPTIMIZERS[opt](net.parameters())
    for x, y in _batches():
        optimizer.zero_grad()
        models.gpt_loss(net(x), y).backward()
        optimizer.step()
    return {k: v.detach() for k, v in net.named_parameters()}


def train_stages(ctx, groups, jobs):
    """Worker: every (stage, optimizer) job inside each group of ``groups`` (lists of ranks; None: the world).

    Returns, per group this rank belongs to, what the jobs left: full parameters, bytes held,
    padded size, bytes sent in the last step, warnings."""
    out = {}
    for ranks in groups:
        group = dist.new_group(ranks) if ranks else None  # every rank must create it
        if ranks and ctx.rank not in ranks:
            continue
        out[tuple(ranks or ())] = {job: _train(ctx, group, *job) for job in jobs}
    return out


def _train(ctx, group, stage: int, opt: str) -> dict:
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0 if rank == 0 else 100 + rank)  # the reference's weights on the group's first rank only:
    # the constructor's broadcast must give them to every rank
    model = zero.ZeroDataParallel(models.gpt(CONFIG), OPTIMIZERS[opt], stage, group=group)

    def step(x, y):
        model.zero_grad()
        models.gpt_loss(model(split_batch(x, rank, n)), split_batch(y, rank, n)).backward()
        model.step()

    *first, last = _batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in first:
            step(x, y)
        with count_traffic({group: "zero"}) as traffic:
            step(*last)
    return {"params": model.full_parameters(), "held": model.held_bytes(), "padded": model.padded_numel,
            "sent": traffic.wire_bytes(), "other_axes": set(traffic.calls()) - {"zero"},
            "warnings": [str(w.message) for w in caught]}


@pytest.fixture(scope="module")
def trained():
    """{N: what the group's first rank returned}: N = 2 (a world of 2), 4 (a world of 4), 3 (ranks 1-3 of 4)."""
    two = run(train_stages, 2, [None], [*JOBS, (1, "sgd")], backend="gloo", timeout=240)
    four = run(train_stages, 4, [None, [1, 2, 3]], JOBS, backend="gloo", timeout=240)
    assert (1, 2, 3) not in four[0]  # rank 0 stayed out of the sub-group
    return {2: two[0][()], 3: four[1][(1, 2, 3)], 4: four[0][()]}


@pytest.fixture(scope="module")
def references():
    return {opt: _reference(opt) for opt in OPTIMIZERS}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_stage_trains_as_one_process_and_as_plain_data_parallelism(trained, references, n):
    for stage, opt in JOBS:
        params = trained[n][(stage, opt)]["params"]
        torch.testing.assert_close(params, references[opt], **TOLERANCE[opt],
                                   msg=lambda m, job=(stage, opt): f"{job}: {m}")
        torch.testing.assert_close(params, trained[n][(0, opt)]["params"], **TOLERANCE[opt])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_units_pad_to_a_multiple_of_the_group_size(trained, n):
    padded = sum(-(-size // n) * n for size in UNIT_SIZES)
    assert {r["padded"] for r in trained[n].values()} == {padded}
    assert (padded > sum(UNIT_SIZES)) == (n > 2)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_held_bytes_follow_the_formulas(trained, n):
    psi = sum(UNIT_SIZES)
    for (stage, opt), result in trained[n].items():
        held = result["held"]
        exact = zero.zero_bytes_per_rank(result["padded"], n, stage, optimizer=opt)
        counters = 4 * len(UNIT_SIZES) if opt == "adam" else 0  # Adam's float32 step, one per flat tensor
        assert held["param_bytes"] == exact["param_bytes"] and held["grad_bytes"] == exact["grad_bytes"]
        assert held["optim_bytes"] == exact["optim_bytes"] + counters, (stage, opt)
        # with Ψ itself, not padded: the padding and the counters stay well under 5%
        formula = zero.zero_bytes_per_rank(psi, n, stage, optimizer=opt)["total_bytes"]
        assert sum(held.values()) == pytest.approx(formula, rel=0.05), (stage, opt)


def test_each_stage_holds_less_than_the_one_before(trained):
    for n, results in trained.items():
        totals = [sum(results[(stage, "adam")]["held"].values()) for stage in zero.STAGES]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, (n, totals)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_bytes_sent_per_step_match_theory_and_stage_3_sends_one_and_a_half_times(trained, n):
    for (stage, opt), result in trained[n].items():
        assert result["other_axes"] == set()  # nothing outside the group
        assert result["sent"]["zero"] == zero.zero_comm_bytes(result["padded"], n, stage), (stage, opt)
    one, three = (trained[n][(stage, "adam")]["sent"]["zero"] for stage in (1, 3))
    assert three == 1.5 * one


def test_an_optimizer_without_state_trains_and_stage_1_warns_that_it_saves_nothing(trained, references):
    result = trained[2][(1, "sgd")]
    torch.testing.assert_close(result["params"], references["sgd"])
    assert result["held"]["optim_bytes"] == 0
    assert len(result["warnings"]) == 1 and "saves no memory" in result["warnings"][0]
    assert not any(r["warnings"] for job, r in trained[2].items() if job != (1, "sgd"))


def test_the_formulas_are_the_zero_papers():
    psi, n = 7.5e9, 64  # the paper's example, mixed-precision Adam: 120, 31.4, 16.6 and 1.9 GB
    totals = [zero.zero_bytes_per_rank(psi, n, s, precision="mixed")["total_bytes"] / 1e9 for s in zero.STAGES]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)
    assert zero.zero_bytes_per_rank(100, 4, 2)["grad_bytes"] == 100  # fp32: 4 bytes / 4 ranks


@pytest.mark.parametrize("stage", [-1, 4, True, "1", 1.5])
def test_a_stage_outside_0_to_3_is_a_clear_error_before_any_collective(stage):
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        zero.ZeroDataParallel(nn.Linear(2, 2), OPTIMIZERS["adam"], stage)
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        zero.zero_bytes_per_rank(100, 2, stage)


def test_models_it_cannot_flatten_are_clear_errors_before_any_collective():
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        zero.ZeroDataParallel(nn.ReLU(), OPTIMIZERS["adam"], 1)
    with pytest.raises(ValueError, match=r"fp32 parameters of one device.*\.float\(\)"):
        zero.ZeroDataParallel(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()), OPTIMIZERS["adam"], 1)


def no_optimizer_on_rank_1(ctx):
    """Worker: rank 1's optimizer factory returns no optimizer, while rank 0 goes on to train in stage 3."""
    factory = (lambda params: params) if ctx.rank == 1 else OPTIMIZERS["adam"]
    model = zero.ZeroDataParallel(models.gpt(CONFIG), factory, 3)
    for x, y in _batches():  # rank 0 waits in the first all-gather for a rank that is gone
        models.gpt_loss(model(split_batch(x, ctx.rank, 2)), split_batch(y, ctx.rank, 2)).backward()
        model.step()


def test_a_bad_optimizer_factory_is_a_clear_error_and_the_other_rank_does_not_hang():
    with pytest.raises(RankError, match="rank 1 failed: TypeError: optimizer_factory must return a torch.optim"):
        run(no_optimizer_on_rank_1, 2, backend="gloo", timeout=60)


def test_fsdp1_hybrid_shard_on_cpu_skips_the_cross_rank_reduction_unless_the_mesh_is_explicit(references):
    """torch 2.14.1: without a mesh, HYBRID_SHARD shards within a "node" of torch.cpu.device_count() = 1
    rank, clamps that group of one to NO_SHARD (warning that it does) and all-reduces the gradients
    within it only: the replicas never average. A 2-D mesh of 2 replicas × 2 shards is correct."""
    sgd = TrainConfig(steps=STEPS, global_batch=BATCH, lr=0.1)  # OPTIMIZERS["sgd"] over _batches()
    (default, switched), (meshed, meshed_switched) = run(bench_zero.fsdp1_hybrid_shard, 4, BUILD, X, Y, sgd,
                                                         backend="gloo", timeout=240)[0]
    torch.testing.assert_close(meshed, references["sgd"])
    assert max((default[k] - v).abs().max().item() for k, v in references["sgd"].items()) > 1e-3
    assert switched and "switching to use `NO_SHARD`" in switched[0] and not meshed_switched


def test_fsdp1_hybrid_shard_on_an_odd_number_of_ranks_is_a_clear_error():
    with pytest.raises(RankError, match="even number of ranks, got 1"):
        run(bench_zero.fsdp1_hybrid_shard, 1, BUILD, X, Y, TrainConfig(steps=1, global_batch=BATCH),
            backend="gloo", timeout=60)


@pytest.fixture(scope="module")
def bench_records():
    with pytest.MonkeyPatch.context() as mp:
        # the same code path on a GPT small enough for seconds
        mp.setattr(bench_zero, "ZERO_QUICK_MODEL", {"block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16})
        return bench_zero.bench_zero(world_sizes=(2,), quick=True, rounds=1, steps_per_round=1, timeout=240)


def test_ours_zero_redundancy_optimizer_and_fsdp2_train_as_one_process_does(bench_records):
    assert [(r["impl"], r["stage"]) for r in bench_records] == list(bench_zero.ZERO_CONFIGS)
    for r in bench_records:
        assert r["max_abs_diff_vs_single"] < 2e-5, (r["impl"], r["stage"])  # Adam: see TOLERANCE


def test_bench_bytes_held_and_sent_beside_the_formulas(bench_records):
    by = {(r["impl"], r["stage"]): r for r in bench_records}
    for r in bench_records:
        assert r["held_bytes"] == r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]
        if r["impl"] in ("ddp", "nanopar", "fsdp2"):  # ZeroRedundancyOptimizer's shares are whole tensors
            assert r["held_vs_predicted"] == pytest.approx(1, abs=0.05), (r["impl"], r["stage"])
    for config in [("ddp", 0), ("nanopar", 1), ("nanopar", 3), ("fsdp2", 3)]:
        assert by[config]["comm_bytes"] == pytest.approx(by[config]["comm_bytes_predicted"], rel=0.01), config
    # ZeroRedundancyOptimizer all-reduces the full gradients and then broadcasts the parameters
    zro = by[("zero_redundancy_optimizer", 1)]
    assert zro["comm_bytes"] == pytest.approx(1.5 * by[("nanopar", 1)]["comm_bytes"], rel=0.01)
    assert by[("fsdp2", 3)]["param_bytes"] == pytest.approx(by[("nanopar", 3)]["param_bytes"], rel=0.05)


def test_cli_writes_the_records_and_the_plot(bench_records, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_zero, "bench_zero", lambda world_sizes, quick: bench_records)
    path, plot = tmp_path / "zero.json", tmp_path / "zero.png"
    assert cli.main(["bench", "zero", "--quick", "--json", str(path), "--plot", str(plot)]) == 0
    records = json.loads(path.read_text())
    assert [(r["impl"], r["stage"]) for r in records] == list(bench_zero.ZERO_CONFIGS)
    fields = {"impl", "stage", "world_size", "param_bytes", "grad_bytes", "optim_bytes", "predicted_bytes",
              "comm_bytes", "step_s"}
    assert all(fields <= r.keys() for r in records)
    assert plot.stat().st_size > 0
    out = capsys.readouterr().out
    assert "fsdp2" in out and "zero_redundancy_optimizer" in out


def test_plot_draws_memory_against_the_formula_and_step_time(bench_records):
    matplotlib.use("Agg")
    fig = plotting.plot_zero_bench(bench_records)
    memory, speed = fig.axes[:2]
    assert len(memory.patches) == 3 * len(bench_records) and len(speed.patches) == len(bench_records)


@pytest.mark.parametrize("sizes", [["1"], ["3"]])
def test_cli_rejects_world_sizes_that_cannot_shard_or_split_the_batch(sizes, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "zero", "--quick", "--world-sizes", *sizes])
    assert "world sizes" in capsys.readouterr().err

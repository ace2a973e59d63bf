"""Pipeline schedules as data (chapters 3.2 and 4.2): valid, the known bubble, the known memory."""
import pytest

from nanopar import schedules
from nanopar.schedules import Op, bubble_fraction, gpipe, idle_fraction, naive, one_f_one_b, peak_in_flight, validate

SIZES = [(1, 1), (1, 4), (2, 1), (2, 4), (3, 5), (4, 2), (4, 8), (8, 16)]


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("p, m", SIZES)
def test_every_schedule_is_valid_and_complete(name, p, m):
    ops = schedules.make(name, p, m)
    validate(ops, p, m)
    assert len(ops) == 2 * p * m
    assert all(isinstance(o, Op) and o.kind in "FB" for o in ops)


def test_gpipe_is_all_forwards_then_all_backwards():
    for s in range(3):
        kinds = "".join(o.kind for o in schedules.stage_ops(gpipe(3, 4), s))
        assert kinds == "FFFFBBBB"
    # The forward wave: stage s starts micro-batch j in slot s + j.
    assert all(o.slot == o.stage + o.microbatch for o in gpipe(3, 4) if o.kind == "F")


def test_one_f_one_b_warms_up_then_alternates():
    order = lambda s: "".join(f"{o.kind}{o.microbatch}" for o in schedules.stage_ops(one_f_one_b(4, 6), s))  # noqa: E731
    assert order(0) == "F0F1F2F3B0F4B1F5B2B3B4B5"
    assert order(3) == "F0B0F1B1F2B2F3B3F4B4F5B5"


def test_naive_never_overlaps_stages():
    ops = naive(3, 2)
    assert len({o.slot for o in ops}) == len(ops)  # one op in each slot: only one stage works
    assert naive(2) == [Op(0, 0, 0, "F"), Op(1, 1, 0, "F"), Op(2, 1, 0, "B"), Op(3, 0, 0, "B")]


@pytest.mark.parametrize("p, m", SIZES)
def test_bubble_of_gpipe_and_1f1b_is_the_formula(p, m):
    assert bubble_fraction(p, m) == pytest.approx((p - 1) / (m + p - 1))
    for ops in (gpipe(p, m), one_f_one_b(p, m)):
        assert idle_fraction(ops, p) == pytest.approx(bubble_fraction(p, m))
    # the naive split keeps all but one stage idle, whatever m is
    assert idle_fraction(naive(p, m), p) == pytest.approx(1 - 1 / p)


@pytest.mark.parametrize("p, m", SIZES)
def test_in_flight_micro_batches_gpipe_m_and_1f1b_at_most_p_minus_stage(p, m):
    for s in range(p):
        assert peak_in_flight(gpipe(p, m), s) == m
        assert peak_in_flight(one_f_one_b(p, m), s) == min(p - s, m)
        assert peak_in_flight(naive(p, m), s) == 1


@pytest.mark.parametrize("p, m", SIZES)
def test_speedup_is_the_naive_steps_time_over_the_pipelines(p, m):
    # The naive split runs the whole batch as one micro-batch, each op m times as long as
    # one micro-batch's; the pipeline runs m micro-batches of unit ops.
    naive_time = schedules.step_time(naive(p, 1), p, lambda *_: float(m))
    for ops in (gpipe(p, m), one_f_one_b(p, m)):
        assert naive_time / schedules.step_time(ops, p, lambda *_: 1.0) == pytest.approx(schedules.speedup(p, m))
    assert schedules.speedup(p, m) == pytest.approx(p * (1 - bubble_fraction(p, m)))


def test_more_micro_batches_shrink_the_bubble():
    fractions = [bubble_fraction(4, m) for m in (1, 2, 4, 8, 16, 32)]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] == 0.75


@pytest.mark.parametrize("broken, message", [
    (lambda ops: ops[1:], "missing"),
    (lambda ops: ops + [ops[0]], "appears twice"),
    (lambda ops: [o._replace(slot=9) if (o.kind, o.stage, o.microbatch) == ("F", 0, 0) else o for o in ops],
     "backward must come after its forward"),
    (lambda ops: [o._replace(slot=1) if (o.kind, o.stage, o.microbatch) == ("F", 0, 0) else o for o in ops],
     "two ops in slot 1|before stage 1"),
    (lambda ops: [o._replace(stage=5) if o.slot == 0 else o for o in ops], "out of range"),
    (lambda ops: [o._replace(kind="X") if o.slot == 0 else o for o in ops], "kind must be"),
])
def test_validate_rejects_broken_schedules(broken, message):
    with pytest.raises(ValueError, match=message):
        validate(broken(naive(2, 1)), 2, 1)


def test_backward_order_across_stages_is_checked():
    ops = [Op(0, 0, 0, "F"), Op(1, 1, 0, "F"), Op(2, 0, 0, "B"), Op(3, 1, 0, "B")]
    with pytest.raises(ValueError, match="backward on stage 1 must come before stage 0"):
        validate(ops, 2, 1)


@pytest.mark.parametrize("p, m, what", [(0, 1, "stages"), (2, 0, "micro-batches"), (2, -1, "micro-batches"),
                                        (1.5, 2, "stages"), (True, 2, "stages")])
def test_sizes_must_be_positive_integers(p, m, what):
    for f in (gpipe, one_f_one_b, naive, bubble_fraction, schedules.speedup):
        with pytest.raises(ValueError, match=f"number of {what} must be a positive integer"):
            f(p, m)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match=r"choose one of \['1f1b', 'gpipe', 'naive'\]"):
        schedules.make("zero-bubble", 2, 2)


def test_timeline_with_unit_ops_is_the_schedule_itself():
    for name in schedules.SCHEDULES:
        ops = schedules.make(name, 3, 5)
        times = schedules.timeline(ops, 3, lambda *_: 1.0)
        assert {(o.kind, o.stage, o.microbatch): (o.slot, o.slot + 1) for o in ops} == times


@pytest.mark.parametrize("m, span, f1b_handoffs", [(2, 9, 2), (3, 12, 4), (4, 15, 4)])
def test_timeline_puts_more_handoffs_on_1f1bs_critical_path(m, span, f1b_handoffs):
    # Forward 1, backward 2, 2 stages, worked by hand (chapter 4.2): with messages taking c,
    # GPipe's step grows by 2c (the first forward and the first backward handoff), 1F1B's
    # by 2c·ceil(m/2): in its steady state the stages wait on each other's messages.
    cost = lambda kind, s, j: 1.0 if kind == "F" else 2.0  # noqa: E731
    for c in (0.0, 0.25, 1.5):
        assert schedules.step_time(gpipe(2, m), 2, cost, c) == pytest.approx(span + 2 * c)
        assert schedules.step_time(one_f_one_b(2, m), 2, cost, c) == pytest.approx(span + f1b_handoffs * c)


def test_timeline_keeps_each_stage_order_and_dependencies():
    cost = lambda kind, s, j: 0.5 + 0.1 * s + (0.3 * j if kind == "B" else 0.0)  # noqa: E731
    ops = one_f_one_b(4, 6)
    times = schedules.timeline(ops, 4, cost, latency=0.05)
    for s in range(4):
        order = [times[o.kind, s, o.microbatch] for o in schedules.stage_ops(ops, s)]
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(order, order[1:]))
    for (kind, s, j), (start, end) in times.items():
        assert end - start == pytest.approx(cost(kind, s, j))
        if kind == "F" and s:
            assert start >= times["F", s - 1, j][1] + 0.05 - 1e-12
        if kind == "B" and s < 3:
            assert start >= times["B", s + 1, j][1] + 0.05 - 1e-12


def test_timeline_refuses_negative_latency():
    with pytest.raises(ValueError, match="negative time"):
        schedules.timeline(gpipe(2, 2), 2, lambda *_: 1.0, latency=-0.1)

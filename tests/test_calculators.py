"""The book's kernel-free calculators compute what nanopar computes (chapters 1, 2 and 3).

Each calculator's JavaScript (book/_static/calculators/) is loaded in Node.js and called
on a grid of inputs: its numbers must equal those of the Python functions it mirrors, to
float rounding, and the schedule explorer must produce `nanopar.schedules.make`'s op list.
tests/test_browser.py checks the same calculators on their pages.
"""
import itertools
import json
import os
import pathlib
import shutil
import subprocess

import pytest

from nanopar import cost, memory_model, schedules

CALCULATORS = pathlib.Path(__file__).resolve().parents[1] / "book" / "_static" / "calculators"

# Reads [[function, args], ...] from stdin and prints, per call, {"value": ...} or {"error": message}.
CALL_ALL = """
const calculator = require(process.argv[1]);
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const results = JSON.parse(input).map(([name, args]) => {
    try { return { value: calculator[name](...args) }; } catch (error) { return { error: error.message }; }
  });
  process.stdout.write(JSON.stringify(results));
});
"""


def call_js(script: str, calls: list[tuple[str, list]]) -> list[dict]:
    """Call the functions that ``script`` exports, in one Node.js process."""
    node = shutil.which("node")
    if node is None:
        message = "Node.js is not installed (apt-get install nodejs): the calculators cannot be checked"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run([node, "-e", CALL_ALL, str(CALCULATORS / script)], input=json.dumps(calls),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def python_error(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


PARAMS = [1, 1_000, 16_640, 1.3e9, 7e9, 70e9, 175e9, 1e12]
GRIDS = [(1, 1, 1), (8, 1, 1), (64, 1, 1), (3, 2, 2), (4, 8, 4), (1, 4, 8)]
SPECS = [None, dict(batch=1, seq=4096, hidden=4096, layers=32, heads=32),
         dict(batch=4, seq=2048, hidden=12288, layers=96, heads=96, checkpointing=True),
         dict(batch=3, seq=64, hidden=128, layers=8, heads=8, attention="fused", dropout=False),
         dict(batch=2, seq=128, hidden=256, layers=16, heads=16, checkpointing=True, attention="fused")]


def memory_cases():
    for n, precision, optimizer, stage, (dp, tp, pp), spec in itertools.product(
            PARAMS[::2], memory_model.PRECISIONS, memory_model.OPTIMIZERS, memory_model.ZERO_STAGES, GRIDS, SPECS):
        yield dict(params=n, precision=precision, optimizer=optimizer, zero_stage=stage, dp=dp, tp=tp, pp=pp,
                   activations=spec)


def js_memory_args(case: dict) -> dict:
    return {("zeroStage" if k == "zero_stage" else k): v for k, v in case.items()}


def python_memory(case: dict) -> dict:
    spec = case["activations"]
    return memory_model.memory_per_device(**{**case, "activations": spec and memory_model.ActivationSpec(**spec)})


def test_memory_calculator_equals_memory_model():
    cases = list(memory_cases())
    results = call_js("memory.js", [("memoryPerDevice", [js_memory_args(c)]) for c in cases])
    checked = 0
    for case, result in zip(cases, results):
        expected = python_memory(case)
        assert result["value"] == pytest.approx(expected, rel=1e-14), case
        checked += expected["activations"] > 0
    assert checked > 1000  # the grid does count activations


def test_memory_calculator_bytes_per_param_equal_memory_model():
    cases = list(itertools.product(memory_model.PRECISIONS, memory_model.OPTIMIZERS))
    results = call_js("memory.js", [("bytesPerParam", list(case)) for case in cases])
    for case, result in zip(cases, results):
        b = memory_model.bytes_per_param(*case)
        assert result["value"] == {"weights": b.weights, "grads": b.grads, "optimizer": b.optimizer, "total": b.total}


BAD_MEMORY = [
    dict(params=1e9, precision="fp8"),
    dict(params=1e9, optimizer="lion"),
    dict(params=0),
    dict(params=1e9, zero_stage=4),
    dict(params=1e9, zero_stage=-1),
    dict(params=1e9, dp=0),
    dict(params=1e9, tp=2.5),
    dict(params=1e9, pp=-3),
    dict(params=1e9, tp=3, activations=dict(batch=1, seq=8, hidden=64, layers=4, heads=4)),
    dict(params=1e9, pp=3, activations=dict(batch=1, seq=8, hidden=64, layers=4, heads=4)),
    dict(params=1e9, activations=dict(batch=0, seq=8, hidden=64, layers=4, heads=4)),
    dict(params=1e9, activations=dict(batch=1, seq=8, hidden=64, layers=4, heads=1.5)),
    dict(params=1e9, activations=dict(batch=1, seq=8, hidden=64, layers=4, heads=4, attention="sparse")),
]


def test_memory_calculator_refuses_what_memory_model_refuses():
    results = call_js("memory.js", [("memoryPerDevice", [js_memory_args({"activations": None, **case})])
                                    for case in BAD_MEMORY])
    for case, result in zip(BAD_MEMORY, results):
        assert "error" in result, case
        assert result["error"] == python_error(lambda: python_memory({"activations": None, **case})), case


GRID = [(name, p, m) for name in schedules.SCHEDULES for p in range(1, 6) for m in range(1, 9)]


def test_schedule_explorer_draws_the_op_list_of_nanopar():
    results = call_js("pipeline.js", [("make", [name, p, m]) for name, p, m in GRID])
    for (name, p, m), result in zip(GRID, results):
        assert result["value"] == [list(op) for op in schedules.make(name, p, m)], (name, p, m)


def test_schedule_explorer_fractions_equal_nanopar():
    calls = []
    for name, p, m in GRID:
        ops = [list(op) for op in schedules.make(name, p, m)]
        calls += [("bubbleFraction", [p, m]), ("idleFraction", [ops, p])]
        calls += [("peakInFlight", [ops, stage]) for stage in range(p)]
    results = iter(call_js("pipeline.js", calls))
    for name, p, m in GRID:
        ops = schedules.make(name, p, m)
        assert next(results)["value"] == pytest.approx(schedules.bubble_fraction(p, m), rel=1e-15)
        assert next(results)["value"] == pytest.approx(schedules.idle_fraction(ops, p), rel=1e-15)
        assert [next(results)["value"] for _ in range(p)] == [schedules.peak_in_flight(ops, s) for s in range(p)]


def test_schedule_explorer_refuses_what_nanopar_refuses():
    results = call_js("pipeline.js", [("make", ["gpipe", 0, 4]), ("make", ["gpipe", 2, 1.5]), ("make", ["zb", 2, 2])])
    assert results[0]["error"] == python_error(lambda: schedules.make("gpipe", 0, 4))
    assert results[1]["error"] == python_error(lambda: schedules.make("gpipe", 2, 1.5))
    assert "unknown schedule 'zb'" in results[2]["error"]


ALLREDUCE_GRID = list(itertools.product(
    cost.ALLREDUCE_ALGORITHMS, [1, 2, 3, 4, 5, 7, 8, 16, 64, 1000, 1024], [0, 1, 4096, 1e6, 4e8, 1e10],
    [0, 1e-6, 1e-5], [1e9, 2.5e10],
))


def test_allreduce_calculator_equals_cost():
    results = call_js("allreduce.js", [("allreduceTime", list(case)) for case in ALLREDUCE_GRID])
    for case, result in zip(ALLREDUCE_GRID, results):
        assert result["value"] == pytest.approx(cost.allreduce_time(*case), rel=1e-12, abs=0), case


def test_allreduce_calculator_refuses_what_cost_refuses():
    bad = [("butterfly", 4, 1e6, 1e-5, 1e9), ("ring", 0, 1e6, 1e-5, 1e9), ("ring", 4, -1, 0, 1e9), ("ring", 4, 1e6, 0, 0)]
    results = call_js("allreduce.js", [("allreduceTime", list(case)) for case in bad])
    for case, result in zip(bad, results):
        assert result["error"] == python_error(lambda: cost.allreduce_time(*case))

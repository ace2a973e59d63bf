// All-reduce cost in the alpha-beta model (chapter 2), the formulas of
// nanopar.cost.allreduce_time; tests/test_calculators.py checks that the two agree.
(function () {
  const ALGORITHMS = ["ring", "tree", "naive"];

  const ceilLog2 = (n) => {
    let levels = 0;
    while (2 ** levels < n) levels += 1;
    return levels;
  };

  function allreduceTime(algorithm, ranks, nbytes, alphaS, bandwidthBps) {
    if (!ALGORITHMS.includes(algorithm)) {
      throw new Error(`unknown algorithm '${algorithm}'; choose one of: ${ALGORITHMS.join(", ")}`);
    }
    if (!Number.isInteger(ranks) || ranks < 1) throw new Error(`ranks must be a positive integer, got ${ranks}`);
    if (nbytes < 0 || alphaS < 0) throw new Error(`nbytes and alpha_s cannot be negative, got ${nbytes} and ${alphaS}`);
    if (!(bandwidthBps > 0)) throw new Error(`bandwidth_Bps must be > 0, got ${bandwidthBps}`);
    const message = alphaS + nbytes / bandwidthBps;
    if (algorithm === "ring") return 2 * (ranks - 1) * alphaS + 2 * (ranks - 1) / ranks * nbytes / bandwidthBps;
    if (algorithm === "tree") return 2 * ceilLog2(ranks) * message;
    return 2 * (ranks - 1) * message;
  }

  if (typeof module !== "undefined") {
    module.exports = { ALGORITHMS, allreduceTime };
    return;
  }

  // Decimal units, as the book's notation says: 1 MB = 1e6 bytes, 1 GB/s = 1e9 bytes per second.
  const fields = [
    { name: "ranks", label: "ranks N", value: 8, min: 1, step: 1 },
    { name: "megabytes", label: "message S (MB)", value: 400, min: 0 },
    { name: "microseconds", label: "latency α (µs)", value: 10, min: 0 },
    { name: "gigabytesPerS", label: "bandwidth β (GB/s)", value: 25, min: 0 },
  ];
  const descriptions = {
    ring: "2(N−1)α + 2(N−1)/N · S/β",
    tree: "2⌈log₂N⌉ (α + S/β)",
    naive: "2(N−1)(α + S/β)",
  };
  function render({ ranks, megabytes, microseconds, gigabytesPerS }, output) {
    const times = ALGORITHMS.map((a) => allreduceTime(a, ranks, megabytes * 1e6, microseconds * 1e-6, gigabytesPerS * 1e9));
    const rows = [["algorithm", "time (ms)", "formula"]];
    ALGORITHMS.forEach((a, i) => rows.push([a, [(times[i] * 1e3).toFixed(3), a], descriptions[a]]));
    const fastest = document.createElement("p");
    const best = ALGORITHMS[times.indexOf(Math.min(...times))];
    fastest.append("fastest here: ", Object.assign(document.createElement("strong"), { textContent: best }));
    fastest.dataset.result = "fastest";
    output.replaceChildren(window.bookTable(rows), fastest);
  }
  document.querySelectorAll('[data-calculator="allreduce"]').forEach((root) => window.bookCalculator(root, fields, render));
})();

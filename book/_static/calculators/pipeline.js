// Pipeline schedule explorer (chapter 3): the op lists of nanopar.schedules (naive, gpipe,
// 1f1b), drawn as a Gantt chart with their idle fraction. The same algorithm as the
// Python, so the chart is what nanopar runs; tests/test_calculators.py checks the op lists.
(function () {
  const SCHEDULES = { naive, gpipe, "1f1b": oneFOneB };

  function checkSizes(p, m) {
    if (!Number.isInteger(p) || p < 1) throw new Error(`the number of stages must be a positive integer, got ${p}`);
    if (!Number.isInteger(m) || m < 1) throw new Error(`the number of micro-batches must be a positive integer, got ${m}`);
  }

  const bySlotThenStage = (a, b) => a[0] - b[0] || a[1] - b[1];

  // Each stage runs its ops in its order, each op one slot, as early as its input allows:
  // F(s, j) needs F(s-1, j); B(s, j) needs B(s+1, j) (the last stage's B needs its own F).
  function place(orders) {
    const p = orders.length;
    const end = new Map();  // "kind,stage,microbatch" -> slot after the op
    const next = new Array(p).fill(0);
    const free = new Array(p).fill(0);
    const ops = [];
    while (next.some((n, s) => n < orders[s].length)) {
      let progressed = false;
      for (let s = 0; s < p; s++) {
        if (next[s] === orders[s].length) continue;
        const [kind, j] = orders[s][next[s]];
        let ready = 0;
        if (!(kind === "F" && s === 0)) {
          const dep = kind === "F" ? ["F", s - 1, j] : s < p - 1 ? ["B", s + 1, j] : ["F", s, j];
          if (!end.has(dep.join())) continue;
          ready = end.get(dep.join());
        }
        const start = Math.max(ready, free[s]);
        free[s] = start + 1;
        end.set([kind, s, j].join(), free[s]);
        ops.push([start, s, j, kind]);
        next[s] += 1;
        progressed = true;
      }
      if (!progressed) throw new Error("the stage orders deadlock");
    }
    return ops.sort(bySlotThenStage);
  }

  function naive(p, m) {
    checkSizes(p, m);
    const ops = [];
    for (let j = 0; j < m; j++) {
      const base = 2 * p * j;
      for (let s = 0; s < p; s++) ops.push([base + s, s, j, "F"]);
      for (let s = 0; s < p; s++) ops.push([base + p + (p - 1 - s), s, j, "B"]);
    }
    return ops.sort(bySlotThenStage);
  }

  function range(n, kind, from = 0) {
    return Array.from({ length: n }, (_, i) => [kind, from + i]);
  }

  function gpipe(p, m) {
    checkSizes(p, m);
    return place(Array.from({ length: p }, () => [...range(m, "F"), ...range(m, "B")]));
  }

  function oneFOneB(p, m) {
    checkSizes(p, m);
    const orders = [];
    for (let s = 0; s < p; s++) {
      const warmup = Math.min(p - s - 1, m);
      const order = range(warmup, "F");
      for (let j = 0; j < m - warmup; j++) order.push(["F", warmup + j], ["B", j]);  // one F, then the oldest B
      orders.push([...order, ...range(warmup, "B", m - warmup)]);  // cool-down
    }
    return place(orders);
  }

  function make(name, p, m) {
    if (!(name in SCHEDULES)) {
      throw new Error(`unknown schedule '${name}'; choose one of ${Object.keys(SCHEDULES).sort().join(", ")}`);
    }
    return SCHEDULES[name](p, m);
  }

  function bubbleFraction(p, m) {
    checkSizes(p, m);
    return (p - 1) / (m + p - 1);
  }

  function idleFraction(ops, p) {
    const slots = Math.max(...ops.map((op) => op[0])) + 1;
    return 1 - ops.length / (p * slots);
  }

  function peakInFlight(ops, stage) {
    let held = 0;
    let peak = 0;
    for (const op of ops.filter((o) => o[1] === stage).sort(bySlotThenStage)) {
      held += op[3] === "F" ? 1 : -1;
      peak = Math.max(peak, held);
    }
    return peak;
  }

  if (typeof module !== "undefined") {
    module.exports = { make, bubbleFraction, idleFraction, peakInFlight };
    return;
  }

  const COLORS = { F: "#4C72B0", B: "#DD8452" };  // as nanopar.plotting draws schedules
  const SVG = "http://www.w3.org/2000/svg";
  function svgElement(tag, attributes, text) {
    const element = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
    if (text !== undefined) element.textContent = text;
    return element;
  }

  function gantt(ops, p) {
    const slots = Math.max(...ops.map((op) => op[0])) + 1;
    const cell = Math.max(8, Math.min(28, Math.floor(640 / slots)));
    const row = 26;
    const left = 58;
    const svg = svgElement("svg", {
      viewBox: `0 0 ${left + slots * cell + 4} ${p * row + 24}`, role: "img", class: "calculator-gantt",
      "aria-label": `pipeline schedule: ${p} stages, ${slots} time slots`,
    });
    for (let s = 0; s < p; s++) {  // a faint band per stage: what stays uncovered is its idle time
      svg.appendChild(svgElement("text", { x: 0, y: s * row + 17, "font-size": 11, fill: "currentColor" }, `stage ${s}`));
      svg.appendChild(svgElement("rect", {
        x: left, y: s * row + 2, width: slots * cell - 1, height: row - 4, fill: "currentColor", "fill-opacity": 0.07,
      }));
    }
    for (const [slot, stage, j, kind] of ops) {
      const box = svgElement("rect", {
        x: left + slot * cell, y: stage * row + 2, width: cell - 1, height: row - 4, fill: COLORS[kind],
        "data-op": `${slot},${stage},${j},${kind}`,
      });
      const what = kind === "F" ? "forward" : "backward";
      box.appendChild(svgElement("title", {}, `slot ${slot}: stage ${stage}, ${what} of micro-batch ${j}`));
      svg.appendChild(box);
      if (cell >= 14) {
        svg.appendChild(svgElement("text", {
          x: left + slot * cell + (cell - 1) / 2, y: stage * row + 17,
          "font-size": 10, fill: "white", "text-anchor": "middle",
        }, String(j)));
      }
    }
    svg.appendChild(svgElement("text", { x: left, y: p * row + 16, "font-size": 11, fill: "currentColor" },
      `time slot → (${slots} slots; blue: forward, orange: backward; numbers: micro-batch)`));
    return svg;
  }

  const fields = [
    { name: "p", label: "stages p", value: 4, min: 1, max: 16, step: 1 },
    { name: "m", label: "micro-batches m", value: 8, min: 1, max: 64, step: 1 },
    {
      name: "schedule", label: "schedule", value: "1f1b",
      options: [["naive", "naive"], ["gpipe", "GPipe"], ["1f1b", "1F1B"]],
    },
  ];
  function render({ p, m, schedule }, output) {
    const ops = make(schedule, p, m);
    const table = window.bookTable([
      ["idle share of the chart", "(p − 1)/(m + p − 1)", "most micro-batches stage 0 holds"],
      [
        [idleFraction(ops, p).toFixed(3), "idle"],
        [bubbleFraction(p, m).toFixed(3), "bubble"],
        [String(peakInFlight(ops, 0)), "peak"],
      ],
    ]);
    output.replaceChildren(gantt(ops, p), table);
  }
  document.querySelectorAll('[data-calculator="pipeline"]').forEach((root) => window.bookCalculator(root, fields, render));
})();

// Memory of the training state per device (chapter 1), the arithmetic of
// nanopar.cost.bytes_per_param and training_memory_bytes; tests/test_calculators.py checks
// that the two agree.
(function () {
  const PRECISIONS = ["fp32", "mixed"];
  const OPTIMIZERS = ["sgd", "momentum", "adam"];
  // State tensors per parameter that each optimizer keeps (momentum buffer; Adam's m and v).
  const OPTIMIZER_STATES = { sgd: 0, momentum: 1, adam: 2 };
  const KINDS = ["weights", "grads", "optimizer"];

  function checkChoice(name, value, choices) {
    if (!choices.includes(value)) throw new Error(`unknown ${name} '${value}'; choose one of: ${choices.join(", ")}`);
  }

  function bytesPerParam(precision, optimizer) {
    checkChoice("precision", precision, PRECISIONS);
    checkChoice("optimizer", optimizer, OPTIMIZERS);
    const states = 4 * OPTIMIZER_STATES[optimizer];
    const b = precision === "fp32"
      ? { weights: 4, grads: 4, optimizer: states }
      : { weights: 2, grads: 2, optimizer: 4 + states };  // fp32 master weights next to the states
    return { ...b, total: b.weights + b.grads + b.optimizer };
  }

  // Bytes of each kind of state on one device, kept apart because sharding treats them
  // apart (ZeRO stage 1 splits the optimizer state, 2 the gradients too, 3 the weights).
  function memoryPerDevice({ params, precision, optimizer }) {
    if (!(params > 0)) throw new Error(`n_params must be > 0, got ${params}`);
    const perParam = bytesPerParam(precision, optimizer);
    const bytes = Object.fromEntries(KINDS.map((kind) => [kind, params * perParam[kind]]));
    bytes.total = params * perParam.total;
    return { perParam, bytes };
  }

  const gib = (nBytes) => nBytes / 2 ** 30;

  if (typeof module !== "undefined") {
    module.exports = { PRECISIONS, OPTIMIZERS, bytesPerParam, memoryPerDevice, gib };
    return;
  }

  const oneDecimal = (x) => x.toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const fields = [
    { name: "params", label: "parameters (billions)", value: 7, min: 0.001, step: "any" },
    {
      name: "precision", label: "precision", value: "mixed",
      options: [["fp32", "fp32"], ["mixed", "mixed (fp16/bf16 + fp32 master)"]],
    },
    { name: "optimizer", label: "optimizer", value: "adam", options: OPTIMIZERS.map((o) => [o, o]) },
  ];
  const names = { weights: "weights", grads: "gradients", optimizer: "optimizer state", total: "total" };
  function render(values, output) {
    const { perParam, bytes } = memoryPerDevice({ ...values, params: values.params * 1e9 });
    const rows = [["", "bytes per parameter", "GiB per device"]];
    for (const kind of [...KINDS, "total"]) {
      rows.push([names[kind], [String(perParam[kind]), `${kind}-per-param`], [oneDecimal(gib(bytes[kind])), `${kind}-gib`]]);
    }
    const note = document.createElement("p");
    note.textContent = "Every device holds the whole training state in plain data parallelism; activations come on top.";
    output.replaceChildren(window.bookTable(rows), note);
  }
  document.querySelectorAll('[data-calculator="memory"]').forEach((root) => window.bookCalculator(root, fields, render));
})();

// Memory per device (chapters 1, 3.3 and 6): the arithmetic of nanopar.memory_model's
// memory_per_device, line for line; tests/test_calculators.py checks that the two agree
// and refuse the same input with the same messages.
(function () {
  const PRECISIONS = ["fp32", "mixed", "mixed_fp32_grads", "mixed_fp32_grad_copy", "autocast"];
  const OPTIMIZERS = ["sgd", "momentum", "adam"];
  const ZERO_STAGES = [0, 1, 2, 3];
  const ATTENTION = ["materialized", "fused"];
  const KINDS = ["weights", "grads", "optimizer", "activations"];
  // fp32 tensors per parameter that each optimizer keeps (momentum buffer; Adam's m and v).
  const OPTIMIZER_STATES = { sgd: 0, momentum: 1, adam: 2 };
  // Bytes per parameter: weights, gradients, the optimizer's bytes before its states (master copies).
  const LAYOUTS = {
    fp32: [4, 4, 0], mixed: [2, 2, 4], mixed_fp32_grads: [2, 4, 4], mixed_fp32_grad_copy: [2, 2, 8], autocast: [6, 4, 0],
  };
  // Bytes of a saved activation: [matrix products' inputs and outputs, the residual stream].
  const ACTIVATION_BYTES = {
    fp32: [4, 4], mixed: [2, 2], mixed_fp32_grads: [2, 2], mixed_fp32_grad_copy: [2, 2], autocast: [2, 4],
  };

  const repr = (value) => (typeof value === "string" ? `'${value}'` : String(value));

  function checkChoice(name, value, choices) {
    if (!choices.includes(value)) throw new Error(`unknown ${name} ${repr(value)}; choose one of: ${choices.join(", ")}`);
  }

  function checkPositive(name, value) {
    if (!(value > 0)) throw new Error(`${name} must be > 0, got ${value}`);
  }

  function checkCount(values) {
    for (const [name, value] of Object.entries(values)) {
      if (!Number.isInteger(value) || value < 1) throw new Error(`${name} must be a positive integer, got ${repr(value)}`);
    }
  }

  function checkZeroStage(stage) {
    if (!ZERO_STAGES.includes(stage)) {
      throw new Error("ZeRO stage must be 0, 1, 2 or 3 (0: plain data parallelism; 1: shard the optimizer state; "
        + `2: also the gradients; 3: also the parameters), got ${repr(stage)}`);
    }
  }

  function bytesPerParam(precision, optimizer) {
    checkChoice("precision", precision, PRECISIONS);
    checkChoice("optimizer", optimizer, OPTIMIZERS);
    const [weights, grads, extra] = LAYOUTS[precision];
    const optimizerBytes = extra + 4 * OPTIMIZER_STATES[optimizer];
    return { weights, grads, optimizer: optimizerBytes, total: weights + grads + optimizerBytes };
  }

  // ActivationSpec: the shape of a transformer whose activations are counted.
  function activationSpec({
    batch, seq, hidden, layers, heads, checkpointing = false, attention = "materialized", dropout = true,
  }) {
    checkCount({ batch, seq, hidden, layers, heads });
    checkChoice("attention", attention, ATTENTION);
    return { batch, seq, hidden, layers, heads, checkpointing, attention, dropout };
  }

  function layerActivationBytes(spec, precision, tp) {
    checkCount({ tp });
    if (spec.heads % tp) {
      throw new Error(`heads=${spec.heads} do not split over tp=${tp} tensor-parallel ranks: `
        + "choose tp dividing the number of heads");
    }
    checkChoice("precision", precision, PRECISIONS);
    const [matmul, residual] = ACTIVATION_BYTES[precision];
    const tokens = spec.seq * spec.batch;
    const whole = tokens * spec.hidden * (2 * residual + 2 * matmul + (spec.dropout ? 2 : 0));
    let split = tokens * spec.hidden * 12 * matmul;
    if (spec.attention === "materialized") {
      split += spec.heads * spec.seq * tokens * (matmul + (spec.dropout ? 1 + matmul : 0));
    } else {
      split += spec.heads * tokens * 4;
    }
    return whole + split / tp;
  }

  function activationBytes(spec, precision, tp, pp) {
    checkCount({ pp });
    if (spec.layers % pp) {
      throw new Error(`layers=${spec.layers} do not split evenly into pp=${pp} pipeline stages: `
        + "choose pp dividing the number of layers");
    }
    const layer = layerActivationBytes(spec, precision, tp);
    if (!spec.checkpointing) return spec.layers * layer;
    const residual = ACTIVATION_BYTES[precision][1];
    return spec.layers * spec.seq * spec.batch * spec.hidden * residual + layer;
  }

  // Bytes one device holds, by kind and in total; activations are counted when given a spec.
  function memoryPerDevice({
    params, precision = "mixed", optimizer = "adam", zeroStage = 0, dp = 1, tp = 1, pp = 1, activations = null,
  }) {
    const spec = activations === null ? null : activationSpec(activations);
    checkPositive("params", params);
    checkZeroStage(zeroStage);
    checkCount({ dp, tp, pp });
    const per = bytesPerParam(precision, optimizer);
    const shard = params / (tp * pp);
    const out = {
      weights: per.weights * shard / (zeroStage >= 3 ? dp : 1),
      grads: per.grads * shard / (zeroStage >= 2 ? dp : 1),
      optimizer: per.optimizer * shard / (zeroStage >= 1 ? dp : 1),
      activations: spec === null ? 0 : activationBytes(spec, precision, tp, pp),
    };
    out.total = out.weights + out.grads + out.optimizer + out.activations;
    return out;
  }

  const gib = (nBytes) => nBytes / 2 ** 30;

  if (typeof module !== "undefined") {
    module.exports = {
      PRECISIONS, OPTIMIZERS, bytesPerParam, activationSpec, layerActivationBytes, activationBytes, memoryPerDevice, gib,
    };
    return;
  }

  const oneDecimal = (x) => x.toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const count = (name, label, value) => ({ name, label, value, min: 1, step: 1 });
  const fields = [
    { name: "params", label: "parameters (billions)", value: 7, min: 0.001, step: "any" },
    {
      name: "precision", label: "precision", value: "mixed",
      options: [
        ["fp32", "fp32"],
        ["mixed", "mixed: 16-bit weights and gradients (ZeRO paper, 16 B with Adam)"],
        ["mixed_fp32_grads", "mixed, fp32 gradients (Megatron-LM bf16, 18 B)"],
        ["mixed_fp32_grad_copy", "mixed, fp32 copy of the gradients (Megatron-LM fp16, 20 B)"],
        ["autocast", "torch.autocast: fp32 state + 16-bit weight copy (18 B)"],
      ],
    },
    { name: "optimizer", label: "optimizer", value: "adam", options: OPTIMIZERS.map((o) => [o, o]) },
    {
      name: "zeroStage", label: "ZeRO stage", value: "0",
      options: [["0", "0: none"], ["1", "1: optimizer state"], ["2", "2: + gradients"], ["3", "3: + weights"]],
    },
    count("dp", "data parallel dp", 1),
    count("tp", "tensor parallel tp", 1),
    count("pp", "pipeline stages pp", 1),
    {
      name: "activations", label: "activations", value: "off",
      options: [["off", "not counted"], ["saved", "all saved"], ["checkpointed", "checkpointed per layer"]],
    },
    count("batch", "micro-batch b", 1),
    count("seq", "sequence s", 4096),
    count("hidden", "hidden h", 4096),
    count("layers", "layers", 32),
    count("heads", "heads", 32),
    {
      name: "attention", label: "attention", value: "fused",
      options: [["fused", "fused (FlashAttention)"], ["materialized", "materialized scores"]],
    },
    { name: "dropout", label: "dropout", value: "no", options: [["no", "no"], ["yes", "yes"]] },
  ];
  const names = {
    weights: "weights", grads: "gradients", optimizer: "optimizer state", activations: "activations", total: "total",
  };
  function render(values, output) {
    const { batch, seq, hidden, layers, heads, attention } = values;
    const activations = values.activations === "off" ? null : {
      batch, seq, hidden, layers, heads, attention,
      checkpointing: values.activations === "checkpointed", dropout: values.dropout === "yes",
    };
    const zeroStage = Number(values.zeroStage);
    const bytes = memoryPerDevice({ ...values, params: values.params * 1e9, zeroStage, activations });
    const perParam = bytesPerParam(values.precision, values.optimizer);
    const rows = [["", "bytes per parameter", "GiB per device"]];
    for (const kind of [...KINDS, "total"]) {
      const per = kind === "activations" ? "" : [String(perParam[kind]), `${kind}-per-param`];
      rows.push([names[kind], per, [oneDecimal(gib(bytes[kind])), `${kind}-gib`]]);
    }
    const note = document.createElement("p");
    note.textContent = `One of dp × tp × pp = ${values.dp * values.tp * values.pp} devices: `
      + "each holds 1/(tp·pp) of the model, and ZeRO shards the replicas' state over dp. "
      + "Activations: the first stage of a 1F1B pipeline.";
    output.replaceChildren(window.bookTable(rows), note);
  }
  document.querySelectorAll('[data-calculator="memory"]').forEach((root) => window.bookCalculator(root, fields, render));
})();

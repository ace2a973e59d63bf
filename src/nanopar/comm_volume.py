"""How many bytes each axis of a hybrid grid communicates per training step of a GPT (chapter 3.3).

The formulas of chapter 3.3, exact for ``nanopar.hybrid`` training ``models.gpt``, in the
units :mod:`nanopar.bench.traffic` counts: the *payload* handed to the collectives (an
all-reduce of n bytes counts n on each rank of its group; a send counts its bytes; a
receive nothing), summed over every rank of the world, for one step after the first.
Multiply an all-reduce's payload by 2(N−1)/N for the bytes a ring sends (``Traffic.wire_bytes``).

With B sequences of s tokens per global batch, width h, L layers, d bytes per element:

* tensor (tp > 1): every block all-reduces its activations twice forward (after attention
  and after the MLP: Megatron's g) and their gradients twice backward (f), each of
  b·s·h elements per micro-batch of b sequences. Each of the tp ranks of a stage takes
  part, and the micro-batches of the dp replicas add up to B: 4 · tp · L · B · s · h · d.
* pipeline (pp > 1): at each of the pp − 1 stage boundaries, the activation goes forward and
  its gradient back, b·s·h elements each per micro-batch. Every TP rank of a stage sends
  its own (identical) copy: tp · (pp − 1) · 2 · B · s · h · d, plus the header that the first
  activation of a step carries between each pair of stages (its shape: ``nanopar.p2p``),
  dp · tp · (pp − 1) headers.
* data (dp > 1): each rank all-reduces the gradients of its own parameters: the replicated
  ones (embeddings, LayerNorms, the head, the row-parallel biases) in full, the sharded
  ones (the four matrices of a block, the column-parallel biases) as a 1/tp slice, plus the
  one element that ``nanopar.buckets`` appends to the last bucket (how many parameters
  got no gradient). Over a replica's pp · tp ranks that is tp · R + S + pp · tp elements
  (R replicated, S sharded parameters of the model), times dp replicas: on average each
  rank sends about P/(pp · tp) gradients.

The first step also broadcasts the order of the DP buckets once (``BucketedDataParallel``
rebuilds them after seeing the gradients arrive); the formulas leave that out.
"""
from __future__ import annotations

from .grid import Topology
from .models import GPTConfig
from .p2p import MAX_DIMS

# The header of a pipeline's first activation per step: ndim, dtype and MAX_DIMS sizes, int64 each.
PIPELINE_HEADER_BYTES = (2 + MAX_DIMS) * 8


def gpt_param_counts(config: GPTConfig) -> dict[str, int]:
    """Parameters of ``models.gpt(config)`` that tensor parallelism replicates and shards (chapter 3.3).

    Per block: ``qkv`` (3h² + 3h), the attention's ``proj`` weight (h²), the MLP's ``fc``
    (4h² + 4h) and ``proj`` weight (4h²) are sharded; the two LayerNorms and the two
    row-parallel biases are replicated. Biases and LayerNorm shifts only with ``config.bias``.
    """
    h, v, bias = config.n_embd, config.vocab_size, int(config.bias)
    layer_norm = h * (1 + bias)
    sharded_block = 12 * h * h + bias * 7 * h
    replicated_block = 2 * layer_norm + bias * 2 * h
    embeddings = (v + config.block_size) * h
    head = layer_norm + v * h  # no bias on the output layer, and not tied to the embedding
    replicated = embeddings + config.n_layer * replicated_block + head
    sharded = config.n_layer * sharded_block
    return {"replicated": replicated, "sharded": sharded, "total": replicated + sharded}


def hybrid_comm_bytes(config: GPTConfig, topology: Topology, batch: int, microbatches: int, dtype_bytes: int = 4,
                      seq_len: int | None = None) -> dict[str, int]:
    """Payload bytes per training step by axis, summed over all ranks, for a GPT on ``topology`` (chapter 3.3).

    ``batch`` is the global batch in sequences, each replica cutting its share into
    ``microbatches``; ``seq_len`` tokens per sequence (default ``config.block_size``). The
    totals do not depend on the number of micro-batches (their sizes add up to the batch)
    nor on where the pipeline is cut; the module docstring derives them. Divide by the
    number of ranks for the mean per rank.
    """
    dp, pp, tp = topology.dp, topology.pp, topology.tp
    s = config.block_size if seq_len is None else seq_len
    if not 1 <= s <= config.block_size:
        raise ValueError(f"seq_len={s} must be between 1 and the model's block_size={config.block_size}")
    if config.n_head % tp:
        raise ValueError(f"tp = {tp} does not divide the model's {config.n_head} heads: choose a tp that does")
    if microbatches < 1 or batch % (dp * microbatches):
        raise ValueError(f"a global batch of {batch} does not split over dp = {dp} replicas × {microbatches} "
                         f"micro-batches: use a multiple of {dp * max(microbatches, 1)}")
    activations = batch * s * config.n_embd * dtype_bytes  # the whole batch's b·s·h, once
    params = gpt_param_counts(config)
    tensor = 4 * tp * config.n_layer * activations if tp > 1 else 0
    pipeline = tp * (pp - 1) * (2 * activations + dp * PIPELINE_HEADER_BYTES)
    data = dp * (tp * params["replicated"] + params["sharded"] + pp * tp) * dtype_bytes if dp > 1 else 0
    return {"dp": data, "pp": pipeline, "tp": tensor}

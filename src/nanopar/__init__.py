"""nanopar: parallel training from scratch, checked against PyTorch.

The package behind the book "Parallel Training of Large Models". Each module is one
concern and names the chapter that explains it:

* ``devices``  hardware tiers, backend choice and stage placement (Setting up; chapter 4.2)
* ``launch``   run a function on N ranks and get their results back (chapter 2); with
               ``rank`` (one rank's side), ``local_ranks`` (ranks as processes here),
               ``torchrun`` (ranks started by torchrun), ``rank_stacks`` (where a hung
               rank is) and ``failures`` (which failed rank to blame)
* ``comm``     collectives helpers and a ring all-reduce from send/recv (chapter 2)
* ``cost``     compute and time models of training (chapters 1, 2)
* ``memory_model`` memory per device: training state, activations, ZeRO and the grid
               (chapters 1, 3.3, 6)
* ``models``   the models the chapters train, split and shard
* ``data_parallel``, ``buckets``, ``sharding``, ``sync_batchnorm``, ``training``
               data parallelism from scratch, and the loops that check it (chapters 3.1, 4.1)
* ``model_split``, ``schedules``, ``p2p``, ``pipeline``, ``pipeline_torch``
               model parallelism: the article's split, pipeline schedules as data, the
               stages' messages, a multi-process pipeline executor, and PyTorch's engine
               on the same stages (chapters 3.2, 4.2)
* ``grid``, ``tensor_parallel``, ``hybrid``, ``comm_volume``
               hybrid parallelism: the dp × pp × tp grid and its groups, Megatron tensor
               parallelism, training on a grid, and the bytes each axis moves (chapters 3.3, 4)
* ``train``, ``checkpoint``
               ``python -m nanopar.train`` (also under torchrun), with atomic checkpoints (chapter 4)
* ``text``     the shipped Shakespeare corpus and its character tokenizer (chapter 5.1)
* ``length_batching``  batches of uneven lengths: random, bucketed, balanced (chapter 5.3)
* ``embedding_sharding``, ``recsys``
               embedding tables sharded table-wise and row-wise; a DLRM-like model (chapter 5.4)
* ``zero``     ZeRO stages 0-3 from scratch (chapter 6.5)
* ``bench``    benchmarks behind ``python -m nanopar bench …`` and the analysis of their
               runs: ``collectives``, ``dp``, ``pipeline``, ``microbatching``, ``memory``,
               ``vision``, ``lengths``, ``hybrid``, ``zero``, and ``traffic`` (bytes
               counted at the collectives) (chapters 1 to 6)
* ``plotting`` the book's figures; ``notebook`` hands measured values to the book's prose
"""
from . import devices

__version__ = "0.1.0"
__all__ = ["devices", "__version__"]

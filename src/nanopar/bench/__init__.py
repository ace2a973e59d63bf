"""Benchmarks behind ``python -m nanopar bench …``: JSON records, compared as ratios.

Book: chapter 2 (``collectives``), chapter 4.1 (``dp``), chapter 4.2 (``pipeline`` and
``microbatching``). Timing and analysis of runs live here, never in the techniques they
measure; ``common`` holds the rules every benchmark shares.
"""
from .collectives import bench_collectives, bus_bandwidth, ring_to_gloo_ratio, ring_vs_gloo
from .common import KEEP_FREED_MEMORY, KiB, MiB, PairedRatio, slowest_rank, speed_ratio
from .dp import DP_MODEL, DP_WORKLOADS, bench_dp, dp_ratio, dp_speed_ratio
from .pipeline import (PIPE_BATCH, PIPE_BLOCKS, PIPE_CHANNELS, PIPE_CLASSES, PIPE_SIZE, OpTiming, StepRecorder,
                       bench_pipeline, measured_idle_fraction, pipe_model, pipeline_configs, pipeline_headline,
                       pipeline_sweep, time_budget)

__all__ = ["DP_MODEL", "DP_WORKLOADS", "KEEP_FREED_MEMORY", "KiB", "MiB", "OpTiming", "PIPE_BATCH", "PIPE_BLOCKS",
           "PIPE_CHANNELS", "PIPE_CLASSES", "PIPE_SIZE", "PairedRatio", "StepRecorder", "bench_collectives",
           "bench_dp", "bench_pipeline", "bus_bandwidth", "dp_ratio", "dp_speed_ratio", "measured_idle_fraction",
           "pipe_model", "pipeline_configs", "pipeline_headline", "pipeline_sweep", "ring_to_gloo_ratio",
           "ring_vs_gloo", "slowest_rank", "speed_ratio", "time_budget"]

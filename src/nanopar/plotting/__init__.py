"""The book's figures, drawn from the records the benchmarks return (chapters 1 to 6).

Each function returns a matplotlib Figure that pyplot no longer tracks (so a notebook shows
it exactly once, as the cell's result); pass ``path`` to also save it (PNG or SVG, by
suffix). One module per part of the book; every figure is importable from here.
"""
from .foundations import plot_bandwidth, plot_parallelism_schemes, plot_dp_scaling, plot_losses, plot_training_memory, plot_step_scaling
from .pipelines import plot_schedule, plot_gantt, plot_pipeline_bench, plot_per_sample, plot_tutorial, plot_handoff_cost
from .applications import plot_image_sizes, plot_length_batching, plot_embedding_memory
from .scale import plot_hybrid_bench, plot_grid, plot_zero_bench

__all__ = ["plot_bandwidth", "plot_dp_scaling", "plot_embedding_memory", "plot_gantt", "plot_grid", "plot_handoff_cost", "plot_hybrid_bench", "plot_image_sizes", "plot_length_batching", "plot_losses", "plot_parallelism_schemes", "plot_per_sample", "plot_pipeline_bench", "plot_schedule", "plot_step_scaling", "plot_training_memory", "plot_tutorial", "plot_zero_bench"]

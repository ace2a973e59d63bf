"""Checkpoints of hybrid training: one file per shard, a manifest written last (chapter 4, hybrid training).

Layout under a run's folder ``out``::

    out/latest.json                  the manifest: step, folder, grid, model; written last
    out/step-0000040/pp0-tp1.pt      the shard of pipeline stage 0, tensor-parallel rank 1

A shard's file holds what that rank needs to continue exactly: its parameters (TP
slices), its optimizer state, the step and the state of the data sampler's random
generator. DP replicas hold the same shard, so only replica 0 writes it, and on resume
every replica reads it. That also makes dp free to change between runs (the global batch
and the data stay the same); pp and tp must not (re-sharding across stages or
tensor-parallel ranks is not supported: the manifest check says so).

Crash safety: each file is written to a temporary name and renamed (``os.replace`` is
atomic), every rank then meets at a barrier, and only then does rank 0 replace the
manifest. A run killed at any moment leaves the previous manifest pointing at a complete
checkpoint; older checkpoints are removed after the new manifest is in place. Resuming on
several machines needs ``out`` on a file system they share.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from .grid import Grid, Topology

MANIFEST = "latest.json"


def _replace_atomically(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _folder(step: int) -> str:
    return f"step-{step:07d}"


def _shard_file(grid: Grid) -> str:
    return f"pp{grid.index('pp')}-tp{grid.index('tp')}.pt"


def read_manifest(out: str) -> dict[str, Any] | None:
    """The manifest of the latest complete checkpoint under ``out``, or None if there is none."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def describe(topology: dict[str, Any]) -> str:
    return f"dp {topology['dp']} × pp {topology['pp']} × tp {topology['tp']}"


def check_resume(out: str, topology: Topology, run: dict[str, Any], steps: int) -> dict[str, Any]:
    """The manifest to resume from, or an error that says what to change (chapter 4, hybrid training).

    ``run`` describes this run (model, config, optimizer): it must be the checkpoint's.
    pp and tp must be the checkpoint's; dp may differ.
    """
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"--resume: there is no checkpoint under {out!r} ({MANIFEST} is missing): "
                                "run without --resume to start training, or point --out at the run to continue")
    saved = manifest["topology"]
    if (saved["pp"], saved["tp"]) != (topology.pp, topology.tp):
        raise ValueError(f"the checkpoint under {out!r} holds the shards of a {describe(saved)} grid; this run is "
                         f"{describe(vars(topology))}: resume with --pp {saved['pp']} --tp {saved['tp']} "
                         "(dp may change; re-sharding across stages or tensor-parallel ranks is not supported)")
    for key, value in run.items():
        if manifest["run"].get(key) != value:
            raise ValueError(f"the checkpoint under {out!r} is of another {key}: {manifest['run'].get(key)!r}, "
                             f"this run's is {value!r}: resume with the same settings, or choose another --out")
    if manifest["step"] >= steps:
        raise ValueError(f"the checkpoint under {out!r} is at step {manifest['step']} already: pass --steps "
                         f"greater than {manifest['step']} to continue it")
    return manifest


def save(out: str, step: int, grid: Grid, shard: dict[str, Any], run: dict[str, Any]) -> None:
    """Write this rank's shard of the checkpoint at ``step``, then (rank 0) the manifest (chapter 4, hybrid training).

    A collective: call on every rank of the grid at once.
    """
    folder = os.path.join(out, _folder(step))
    if grid.index("dp") == 0:
        os.makedirs(folder, exist_ok=True)
        _replace_atomically(os.path.join(folder, _shard_file(grid)),
                            lambda path: torch.save({"step": step, **shard}, path))
    dist.barrier()  # every shard is complete before the manifest points at them
    if dist.get_rank() == 0:
        manifest = {"step": step, "folder": _folder(step), "run": run,
                    "topology": {"dp": grid.size("dp"), "pp": grid.size("pp"), "tp": grid.size("tp"),
                                 "order": list(grid.topology.order)}}
        _replace_atomically(os.path.join(out, MANIFEST), lambda path: _write_json(path, manifest))
        for old in os.listdir(out):  # older checkpoints only: a faster rank may be writing the next one
            if old.startswith("step-") and old < _folder(step):
                shutil.rmtree(os.path.join(out, old), ignore_errors=True)


def load(out: str, manifest: dict[str, Any], grid: Grid, device: torch.device) -> dict[str, Any]:
    """This rank's shard of the checkpoint that ``manifest`` names (its DP replica 0's file)."""
    path = os.path.join(out, manifest["folder"], _shard_file(grid))
    if not os.path.exists(path):
        raise FileNotFoundError(f"the checkpoint at step {manifest['step']} lacks {path}: the folder is "
                                "incomplete (copied in part, or not on a file system every machine shares)")
    shard = torch.load(path, map_location=device, weights_only=False)
    if shard["step"] != manifest["step"]:
        raise ValueError(f"{path} is of step {shard['step']}, but the manifest says {manifest['step']}")
    return shard

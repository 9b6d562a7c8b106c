"""Orbax checkpoints of (params, optimizer state) with resume.

The state is saved as its flat list of leaves and rebuilt on restore from the tree structure of a
freshly initialised state, so NNX ``State`` and optax's named tuples need no special handling and a
structure mismatch (a different model or optimizer) is caught leaf by leaf.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict | None = None) -> None:
        leaves = {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(dict(meta or {}, step=step))))
        self.manager.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """Restores into the structure of ``like``; returns ``(state, meta)``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        like_leaves, treedef = jax.tree.flatten(like)
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(leaf), jax.numpy.asarray(leaf).dtype)
                    for i, leaf in enumerate(like_leaves)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        leaves = restored["state"]
        if len(leaves) != len(like_leaves):
            raise ValueError(f"checkpoint at step {step} has {len(leaves)} arrays, the model/optimizer has "
                             f"{len(like_leaves)}: the config changed since it was written")
        return jax.tree.unflatten(treedef, [leaves[f"{i:05d}"] for i in range(len(like_leaves))]), restored["meta"]

    def close(self) -> None:
        self.manager.close()

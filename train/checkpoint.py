"""Orbax checkpoints of (params, optimizer state) with resume.

The state is saved as its flat list of leaves and rebuilt on restore from the tree structure of a
freshly initialised state, so NNX ``State`` and optax's named tuples need no special handling. The
leaves' paths go into the checkpoint's JSON metadata next to the step.

Before restoring, the stored arrays' shapes and dtypes (orbax metadata, nothing is read) are compared
with the state's: a checkpoint of another model or optimizer raises one :class:`CheckpointMismatchError`
that names a differing leaf, instead of failing inside orbax's asynchronous reads.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint holds arrays of other shapes/dtypes (or another number of arrays) than the state."""


def leaf_paths(tree) -> list[str]:
    """``"params/blocks/0/attention/qkv/kernel/value"``-style paths of ``tree``'s leaves, in leaf order."""
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _spec(leaf) -> tuple[tuple[int, ...], str]:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jax.numpy.asarray(leaf).dtype
    return tuple(int(d) for d in np.shape(leaf)), str(np.dtype(dtype))


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def delete_all(self) -> None:
        """Removes every checkpoint in the directory (a fresh run that does not resume)."""
        for step in self.all_steps():
            self.manager.delete(step)

    def save(self, step: int, state, meta: dict | None = None) -> None:
        leaves = {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}
        meta = dict(meta or {}, step=step, paths=leaf_paths(state))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with a checkpoint (``step``, ``paths`` and what ``save`` was given)."""
        step = self._step(step)
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def stored_specs(self, step: int | None = None) -> list[tuple[tuple[int, ...], str]]:
        """``(shape, dtype)`` of each stored array, in leaf order, from orbax's metadata (no array is read)."""
        tree = self.manager.item_metadata(self._step(step))["state"]
        return [(tuple(int(d) for d in tree[key].shape), str(np.dtype(tree[key].dtype))) for key in sorted(tree)]

    def mismatches(self, like, step: int | None = None) -> list[str]:
        """One line per leaf whose stored shape/dtype differs from ``like``'s (empty when they all match),
        plus a line when the number of arrays differs."""
        step = self._step(step)
        stored = self.stored_specs(step)
        stored_paths = list(self.read_meta(step).get("paths") or [])
        like_leaves = jax.tree.leaves(like)
        lines = []
        if len(stored) != len(like_leaves):
            lines.append(f"the checkpoint has {len(stored)} arrays, the model and optimizer state "
                         f"{len(like_leaves)}")
        expected = [(path, _spec(leaf)) for path, leaf in zip(leaf_paths(like), like_leaves)]
        if len(stored_paths) == len(stored) and None not in stored_paths:   # compare leaf by path
            by_path = dict(zip(stored_paths, stored))
            for path, spec in expected:
                if path not in by_path:
                    lines.append(f"{path}: not in the checkpoint, expected {spec[0]} {spec[1]}")
                elif by_path[path] != spec:
                    lines.append(f"{path}: stored {by_path[path][0]} {by_path[path][1]}, expected {spec[0]} {spec[1]}")
            names = {path for path, _ in expected}
            lines += [f"{path}: only in the checkpoint" for path in stored_paths if path not in names]
        else:                                                               # old checkpoint: by position
            for index, ((path, spec), have) in enumerate(zip(expected, stored)):
                if have != spec:
                    lines.append(f"{path} (array {index}): stored {have[0]} {have[1]}, expected {spec[0]} {spec[1]}")
        return lines

    def restore(self, like, step: int | None = None):
        """Restores into the structure of ``like``; returns ``(state, meta)``. Raises
        :class:`CheckpointMismatchError` when the stored arrays do not fit ``like``."""
        step = self._step(step)
        problems = self.mismatches(like, step)
        if problems:
            shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint (step {step}) of another shape than this model and "
                f"optimizer:\n  {shown}")
        like_leaves, treedef = jax.tree.flatten(like)
        stored_paths = list(self.read_meta(step).get("paths") or [])
        # Leaf i of ``like`` is stored array keys[i]: matched by path when the checkpoint names its arrays.
        position = {path: index for index, path in enumerate(stored_paths)}
        keys = [f"{position.get(path, index):05d}" for index, path in enumerate(leaf_paths(like))]
        abstract = {key: jax.ShapeDtypeStruct(*_spec(leaf)) for key, leaf in zip(keys, like_leaves)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        leaves = restored["state"]
        return jax.tree.unflatten(treedef, [leaves[key] for key in keys]), restored["meta"]

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def close(self) -> None:
        self.manager.close()

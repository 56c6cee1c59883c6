"""Orbax checkpoints of operator training state, stamped with the run's fingerprint.

Orbax commits a checkpoint atomically (a temporary directory renamed on completion), so a job
killed mid-save leaves the previous checkpoint intact. A directory written by a run with another
fingerprint (other config, data or model) is refused rather than resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from stride_jax.errors import CheckpointMismatchError

log = logging.getLogger(__name__)


class OperatorCheckpointer:
    def __init__(self, directory: str | Path, fingerprint: str, *, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "fingerprint.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text()).get("fingerprint")
            if old != fingerprint:
                raise CheckpointMismatchError(
                    f"{self.directory} holds operator checkpoints of another run (fingerprint "
                    f"{old}, this run {fingerprint}); use another output directory or --overwrite")
        else:
            from stride_jax.io.atomic import atomic_write_text
            atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint}))
        self._manager = ocp.CheckpointManager(
            self.directory / "state",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
        self._ocp = ocp

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=self._ocp.args.StandardSave(_to_tree(state)))
        self._manager.wait_until_finished()

    def restore(self, like: Any) -> Any | None:
        step = self._manager.latest_step()
        if step is None:
            return None
        # Restore each array with the placement of the live state (sharded over a mesh or not).
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                             sharding=getattr(x, "sharding", None)),
                              _to_tree(like))
        tree = self._manager.restore(step, args=self._ocp.args.StandardRestore(target))
        return _from_tree(like, tree)

    def close(self) -> None:
        self._manager.close()


def _to_tree(state) -> dict:
    # orbax stores dicts of arrays; NamedTuples and optax states are flattened by position.
    leaves = jax.tree.leaves(state)
    return {f"{i:04d}": leaf for i, leaf in enumerate(leaves)}


def _from_tree(like, tree: dict):
    treedef = jax.tree.structure(like)
    leaves = [tree[f"{i:04d}"] for i in range(treedef.num_leaves)]
    return jax.tree.unflatten(treedef, leaves)

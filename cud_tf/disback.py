"""DisBack's two stages around the objectives of `cud_tf.objectives.disback`: the recorded degradation path
(node checkpoints in order, listed in a manifest), the schedule that walks the target back along it, and the
model that trains the generator and the fake network with one compiled step.

The target is one network object: a switch reads a node checkpoint into its variables (no retracing) and checks
the loaded weights against the fingerprint that the manifest recorded when the node was written.
"""
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import List, Optional, Sequence

import numpy as np
import tensorflow as tf

from cud_tf.model import DiffusionModel, OptimConfig
from cud_tf.networks.unet import VelocityUNet, checkpoint_variables
from cud_tf.objectives import disback
from cud_tf.objectives.common import Nets

MANIFEST = "manifest.json"


class PathError(RuntimeError):
    """A degradation path that is missing, incomplete or does not match its manifest, in one line."""


def weight_items(net) -> List[tuple]:
    """(key, variable) of a network's float weights in key order (keys do not depend on the network's name)."""
    return sorted((k, v) for k, v in checkpoint_variables(net).items() if tf.as_dtype(v.dtype).is_floating)


def fingerprint(net) -> str:
    """sha256 of a network's float weights (keys, shapes and bytes, in key order): equal iff the weights are."""
    h = hashlib.sha256()
    for key, v in weight_items(net):
        a = np.ascontiguousarray(np.asarray(v.numpy()))
        h.update(key.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class DegradationPath:
    """The path s'_0 (the teacher) ... s'_N in `directory`: `node_<i>` checkpoints of the degradation network's
    weights after i*M stage-1 steps, listed in order in manifest.json with their step and fingerprint."""

    def __init__(self, directory):
        self.directory = directory

    @property
    def manifest_path(self):
        return os.path.join(self.directory, MANIFEST)

    def manifest(self) -> dict:
        if not os.path.exists(self.manifest_path):
            return {"nodes": []}
        with open(self.manifest_path) as f:
            return json.load(f)

    def nodes(self) -> List[dict]:
        """[{"index", "step", "checkpoint", "sha256"}] in path order."""
        return self.manifest()["nodes"]

    def write_node(self, index: int, step: int, net, chief: bool = True, **meta):
        """Saves `net`'s weights as node `index` (written at stage-1 step `step`) and appends it to the manifest.

        Every worker calls it (a checkpoint write may need all of them); only the chief keeps the files."""
        ckpt = tf.train.Checkpoint(net=checkpoint_variables(net))
        if not chief:
            tmp = tempfile.mkdtemp(prefix="disback_node")
            try:
                ckpt.write(os.path.join(tmp, "node"))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        os.makedirs(self.directory, exist_ok=True)
        name = f"node_{index:03d}"
        ckpt.write(os.path.join(self.directory, name))
        manifest = self.manifest()
        manifest.update(meta)
        nodes = [n for n in manifest["nodes"] if n["index"] != index]
        nodes.append(dict(index=index, step=step, checkpoint=name, sha256=fingerprint(net)))
        manifest["nodes"] = sorted(nodes, key=lambda n: n["index"])
        _write_json(self.manifest_path, manifest)

    def check_complete(self, num_nodes: int):
        """Raises PathError unless nodes 0..num_nodes are all listed, in order, with their files present."""
        nodes = self.nodes()
        if [n["index"] for n in nodes] != list(range(num_nodes + 1)):
            raise PathError(f"{self.directory} holds path nodes {[n['index'] for n in nodes]}, not 0..{num_nodes}; "
                            "rerun stage 1 (the same command resumes it)")
        for n in nodes:
            if not tf.io.gfile.exists(os.path.join(self.directory, n["checkpoint"]) + ".index"):
                raise PathError(f"node {n['index']} of {self.directory} is listed but its checkpoint is missing")

    def load_node(self, index: int, net) -> str:
        """Reads node `index` into `net` (same architecture), checks the weights against the manifest and
        returns their fingerprint."""
        entry = {n["index"]: n for n in self.nodes()}.get(index)
        if entry is None:
            raise PathError(f"{self.directory} has no node {index}; rerun stage 1")
        prefix = os.path.join(self.directory, entry["checkpoint"])
        try:
            tf.train.Checkpoint(net=checkpoint_variables(net)).read(prefix).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as e:
            raise PathError(f"cannot read path node {prefix}: {str(e).splitlines()[0]}") from None
        if fingerprint(net) != entry["sha256"]:
            raise PathError(f"the weights read from {prefix} differ from those recorded in {self.manifest_path}")
        return entry["sha256"]


def node_schedule(num_nodes: int, node_iterations: Sequence[int]) -> List[tuple]:
    """[(first iteration, node)] of the stage-2 target: s'_{N-1} for node_iterations[0] iterations, then s'_{N-2}
    for node_iterations[1], ..., s'_1, then the teacher s'_0 to the end. One value serves every node."""
    if num_nodes < 1:
        return [(0, 0)]
    iters = list(node_iterations)
    if len(iters) == 1:
        iters *= num_nodes - 1
    if len(iters) != num_nodes - 1 or any(i < 1 for i in iters):
        raise ValueError(f"node iterations {list(node_iterations)}: expected one positive value, or one per node "
                         f"s'_{num_nodes - 1}..s'_1 ({num_nodes - 1} values)")
    out, first = [], 0
    for node, n in zip(range(num_nodes - 1, 0, -1), iters):
        out.append((first, node))
        first += n
    return out + [(first, 0)]


def target_node(iteration: int, schedule) -> int:
    """The path node that is the target at 0-based stage-2 iteration `iteration`."""
    node = schedule[0][1]
    for first, n in schedule:
        if iteration >= first:
            node = n
    return node


class DisbackModel(DiffusionModel):
    """The generator `net` (group "velocity", with the EMA that samples and exports read), the fake velocity
    network (group "fake", updated every step) and the frozen target (the path node in use, `nets.teacher`).

    The generator is updated on steps k with (k + 1) % fake_updates_per_generator == 0 (the last step of each
    group, so that steps logged at multiples of the ratio show the generator's metrics); on the other steps a
    cheaper branch computes the fake network's loss alone. Both branches live in one traced step.
    """

    def __init__(self, generator: VelocityUNet, fake: VelocityUNet, target: VelocityUNet, cfg: disback.DisbackConfig,
                 optim_cfg: OptimConfig, global_batch_size: int, seed: int = 0, nonfinite: str = "skip",
                 fake_optim_cfg: Optional[OptimConfig] = None, jit_compile: bool = False, **kw):
        groups = {"velocity": list(generator.trainable_variables), "fake": list(fake.trainable_variables)}
        super().__init__(generator, disback.loss, cfg, optim_cfg, global_batch_size, seed=seed, nonfinite=nonfinite,
                         extra_nets={"fake": fake, "target": target}, groups=groups,
                         optim_cfgs={"velocity": optim_cfg, "fake": fake_optim_cfg or optim_cfg}, **kw)
        # Each kind of step is its own XLA computation and the choice a graph cond around them: one XLA
        # computation holding the cond ran 12x slower on CPU (5 vs 59 img/s, quickstart network, batch 64).
        branches = [functools.partial(DiffusionModel._losses_and_grads, self, objective=o)
                    for o in (disback.loss, disback.fake_loss)]
        self._branches = [tf.function(b, jit_compile=True) if jit_compile else b for b in branches]
        self._losses_and_grads_fn = self._generator_or_fake_step
        self.fake, self.target = fake, target
        target.trainable = False
        self.target_node = None  # host-side: the node whose weights the target holds

    @property
    def nets(self) -> Nets:
        return Nets(velocity=self.net, teacher=self.target, extra={"fake": self.fake})

    def is_generator_step(self, step):
        """True on the last step of every group of fake_updates_per_generator steps (0-based step k)."""
        k = tf.cast(step, tf.int64) + 1
        return tf.equal(tf.math.floormod(k, self.objective_cfg.fake_updates_per_generator), 0)

    def active_groups(self, step):
        return {"velocity": self.is_generator_step(step)}

    def _generator_or_fake_step(self, batch, step, replica_id, num_replicas):
        generator_step, fake_step = self._branches
        return tf.cond(self.is_generator_step(step), lambda: generator_step(batch, step, replica_id, num_replicas),
                       lambda: fake_step(batch, step, replica_id, num_replicas))

    def set_target(self, path: DegradationPath, node: int) -> str:
        """Loads path node `node` into the target network (verified against the manifest); returns its
        fingerprint."""
        sha256 = path.load_node(node, self.target)
        self.target_node = node
        return sha256

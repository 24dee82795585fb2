"""DisBack's degradation path (Zhang et al. 2024, arXiv 2408.15991): stage 1 records it, stage 2 walks back along it.

The path s'_0 (the teacher) ... s'_N is a folder of `node_<i>` checkpoints listed in order, with their step and
a fingerprint of their weights, in manifest.json. `record_degradation_path` trains the degradation network
(stage 1) with the shared training loop and writes the nodes; `node_schedule` and `target_node` say which node
is stage 2's target at each iteration.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, List, Sequence

import numpy as np
import tensorflow as tf

from cud_tf import run_dir, training
from cud_tf.models.base import DiffusionModel, OptimConfig, clone_network, copy_weights
from cud_tf.networks.unet import checkpoint_variables
from cud_tf.objectives import disback

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
        run_dir.write_json(self.manifest_path, manifest)

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




def record_degradation_path(teacher_net, cfg: disback.DisbackConfig, strategy, make_dist_dataset: Callable,
                            optim_cfg: OptimConfig, loop_cfg: training.LoopConfig, *, num_nodes: int,
                            record_every: int, teacher_run_dir: str, global_batch_size: int, seed: int,
                            jit_compile: bool, log=print):
    """Stage 1: trains a copy of the teacher with the RF loss on samples of the frozen G^0(z) = z - v(z, 1) in
    `loop_cfg.run_dir` and writes node i every `record_every` steps into `<loop_cfg.run_dir>/path`. Returns the
    complete DegradationPath, or None when a signal stopped the stage (it saved and resumes). Raises PathError
    for a path of other settings."""
    path = DegradationPath(os.path.join(loop_cfg.run_dir, "path"))
    n, m = num_nodes, record_every
    meta = dict(teacher_run_dir=os.path.abspath(teacher_run_dir), record_every=m, num_nodes=n)
    stored = {k: path.manifest().get(k) for k in meta}
    if path.nodes() and stored != meta:
        raise PathError(f"{path.directory} holds a path of other settings ({stored}); use a new --run_dir")
    with strategy.scope():
        net = clone_network(teacher_net, "degradation")
        generator0 = clone_network(teacher_net, "generator0")
        copy_weights(teacher_net.trainable_variables, net.trainable_variables)
        copy_weights(teacher_net.trainable_variables, generator0.trainable_variables)
        generator0.trainable = False
        model = DiffusionModel(net, disback.degradation_loss, cfg, optim_cfg, global_batch_size=global_batch_size,
                               seed=seed, extra_nets={"generator0": generator0}, jit_compile=jit_compile)
    chief = training.is_chief(strategy)
    recorded = {node["index"] for node in path.nodes()}

    def record(step):
        if step % m == 0 and step // m <= n and step // m not in recorded:
            path.write_node(step // m, step, net, chief=chief, **meta)
            recorded.add(step // m)
            log(f"degradation path: node s'_{step // m} recorded at stage-1 step {step}")

    arch = dict(run_dir.to_json(teacher_net.config), noise_encoder=False, disback_record_every=m)
    loop = dataclasses.replace(loop_cfg, train_steps=n * m, checkpoint_every=m, sample_nfes=(1, 8))
    log(f"DisBack stage 1: {n} nodes every {m} steps ({n * m} steps) in {loop_cfg.run_dir}")
    training.train(model, strategy, make_dist_dataset, loop, arch, teacher_net.config.image_shape, log=log,
                   on_step=record)
    if int(model.step.numpy()) < n * m:  # SIGTERM: stage 1 saved and stopped
        return None
    path.check_complete(n)
    return path


class TargetSwitcher:
    """The training loop's `on_step` hook of stage 2: before iteration k, loads the scheduled node into the
    model's target (verified) when it changes, and appends {"iteration", "node", "sha256"} to `switches_path`
    (chief). With `path=None` (path off) the target is the teacher throughout."""

    def __init__(self, model, path, schedule, train_steps: int, switches_path: str, chief: bool, log=print):
        self.model, self.path, self.schedule, self.train_steps = model, path, schedule, train_steps
        self.switches_path, self.chief, self.log = switches_path, chief, log

    def __call__(self, step: int):
        if step >= self.train_steps:
            return
        node = target_node(step, self.schedule) if self.path is not None else 0
        if node == self.model.target_node:
            return
        if self.path is not None:
            sha256 = self.model.set_target(self.path, node)
        else:
            sha256 = fingerprint(self.model.target)
            self.model.target_node = node
        self.log(f"DisBack stage 2: target s'_{node} from iteration {step}")
        if self.chief:
            with open(self.switches_path, "a") as f:
                f.write(json.dumps(dict(iteration=step, node=node, sha256=sha256)) + "\n")

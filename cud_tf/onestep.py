"""The additional one-step ("two-session") stage of Catch-Up Distillation: stored trajectory targets, their
storage, the per-stage datasets and the stage bounds. Library functions with explicit arguments (no flags);
`trainers/onestep.py` wires them to flags, and `cud_tf.models.onestep.OnestepModel` trains on them.

Shao et al. 2023, "Catch-Up Distillation" (arXiv 2305.10769); the authors' code (github.com/shaoshitong/
Catch-Up-Distillation) stores x0_hat of a 16-step Euler trajectory at steps 8, 11, 14 (`generate.py
--save_sub_traj`) and trains one stage per step (`train_distill_update.py`).
"""
import json
import os

import numpy as np
import tensorflow as tf

from cud_tf import interpolants, run_dir, solvers
from cud_tf.data import pipeline
from cud_tf.sampling import velocity_fn

TRAJECTORIES = "trajectories.npz"


def stage_bounds(num_stages, train_steps=None, stage_steps=None):
    """End step of each stage (cumulative), a list of `num_stages` ints.

    stage_steps: iterations of each stage (`num_stages` values) or of every stage (one value), as the reference
    counts them (each stage runs its own `--iterations`). Without it, `train_steps` is split evenly and the
    remainder goes to the last stage. Raises ValueError for a count that does not fit.
    """
    if num_stages < 1:
        raise ValueError("the one-step stage needs at least one stage")
    if stage_steps:
        steps = list(stage_steps) * num_stages if len(stage_steps) == 1 else list(stage_steps)
        if len(steps) != num_stages:
            raise ValueError(f"{len(stage_steps)} stage iteration counts for {num_stages} stages; give one value "
                             f"or {num_stages}")
        if any(s < 1 for s in steps):
            raise ValueError(f"stage iteration counts must be >= 1, got {list(stage_steps)}")
        return [int(e) for e in np.cumsum(steps)]
    if train_steps is None:
        raise ValueError("give either the total iterations or the iterations per stage")
    per = train_steps // num_stages
    if per < 1:
        raise ValueError(f"{train_steps} iterations are fewer than the {num_stages} stages")
    return [per * (s + 1) for s in range(num_stages - 1)] + [train_steps]


def trajectory_targets(net, z, labels, stages, num_steps, head=1):
    """x0_hat^(m) = x_m - t_m v(x_m, t_m) along the N-step fixed-grid Euler solve from z, for m in `stages`.

    The solve is the samplers' (`solvers.time_grid(N)` and `solvers.rk_slope`/`rk_step` with the Euler
    tableau): x_0 = z, x_{m+1} = x_m - (t_m - t_{m+1}) v(x_m, t_m), t_m = 1 - m/N; m = N gives the endpoint x_N
    (what `sampling.generate(net, z, N)` returns). z `[B,H,W,C]`, labels `[B]` or None, stages: ints in 0..N
    -> `[len(stages), B, H, W, C]`.
    """
    stages = [int(m) for m in stages]
    if not stages or not all(0 <= m <= num_steps for m in stages):
        raise ValueError(f"trajectory steps {stages} must lie in 0..{num_steps}")
    v = velocity_fn(net, head, labels)
    x = tf.convert_to_tensor(z)
    ts = solvers.time_grid(num_steps, "uniform", x.dtype)
    batch = tf.shape(x)[0]
    out = {}
    for i in range(max(stages) + 1):
        if i == num_steps:  # the endpoint x_N itself (t = 0: x0_hat = x)
            out[i] = x
            break
        t = tf.fill([batch], ts[i])
        slope = solvers.rk_slope(v, x, t, ts[i] - ts[i + 1], "euler")  # Euler: the slope is v(x_i, t_i)
        if i in stages:
            out[i] = interpolants.x0_from_v(x_t=x, v=slope, t=t)
        x = x - interpolants.bcast(ts[i] - ts[i + 1], x) * slope
    return tf.stack([out[m] for m in stages])


def generate_trajectories(net, image_shape, stages, num_steps, num_pairs, head=1, seed=0, batch_size=500):
    """Stored pairs of `num_pairs` noises z ~ N(0, I) (stateless, from `seed`) and their targets.

    Class-conditional networks get labels cycling over the classes. Returns numpy {"z": `[P,H,W,C]`,
    "target": `[S,P,H,W,C]` (S = len(stages)), "label": `[P]` int32}.
    """
    num_classes = net.config.num_classes
    conditional = num_classes > 0
    sig = [tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32)]
    gen = tf.function(lambda z, y: trajectory_targets(net, z, y if conditional else None, stages, num_steps, head),
                      input_signature=sig)
    labels = (np.arange(num_pairs) % num_classes if conditional else np.zeros(num_pairs)).astype(np.int32)
    zs, targets = [], []
    for i, start in enumerate(range(0, num_pairs, batch_size)):
        b = min(batch_size, num_pairs - start)
        z = tf.random.stateless_normal([b, *image_shape], seed=[seed, 7919 + i])
        zs.append(z.numpy())
        targets.append(gen(z, tf.constant(labels[start:start + b])).numpy())
    return dict(z=np.concatenate(zs), target=np.concatenate(targets, axis=1), label=labels)


def load_or_generate(path, net, source, image_shape, stages, num_steps, num_pairs, head=1, seed=0, batch_size=500,
                     log=print):
    """The pairs of `generate_trajectories` stored at `path` (.npz), generated and written on first use.

    source: what `net` is (the CUD run directory). The file records the settings (source, stages, N, pairs,
    head, seed); a stored file of other settings raises ValueError (one line), so that a run never trains on
    another run's targets.
    """
    meta = dict(init_run_dir=source, stages=[int(m) for m in stages], grid_steps=num_steps, num_pairs=num_pairs,
                head=head, seed=seed)
    if os.path.exists(path):
        with np.load(path) as f:
            stored = json.loads(str(f["meta"]))
            if stored != meta:
                raise ValueError(f"{path} holds trajectories of other settings ({stored}); use a new run directory")
            return {k: f[k] for k in ("z", "target", "label")}
    out = generate_trajectories(net, image_shape, stages, num_steps, num_pairs, head=head, seed=seed,
                                batch_size=batch_size)
    run_dir.write_atomically(path, lambda f: np.savez(f, meta=json.dumps(meta), **out), "wb")
    log(f"stored {num_pairs} trajectories (targets at steps {list(stages)} of {num_steps}) in {path}")
    return out


def make_dataset(pairs, stage, batch_size, seed, start_batch=0):
    """Shuffled, repeated batches {"z": `[b,H,W,C]`, "target": `[b,H,W,C]`, "label": `[b]`} of stage `stage`
    (index into pairs["target"]), from batch `start_batch` on (resume): pass p's order is a pure function of
    (seed, stage, p)."""
    n = len(pairs["z"])
    ds = tf.data.Dataset.from_tensor_slices(dict(z=pairs["z"], target=pairs["target"][stage], label=pairs["label"]))
    out = pipeline.seeded_passes(ds, n, start_batch * batch_size, tf.constant([seed, stage], tf.int64), n)
    return out.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

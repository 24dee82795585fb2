"""Additional one-step training of a CUD model ("two-session", docs/algorithms.md section 7):
`python -m trainers.onestep --init_run_dir=runs/mnist_quick --flagfile=configs/mnist_onestep.cfg`.

From the CUD run's EMA weights: generate N-step Euler trajectories from stored noise z, keep x0_hat = x_t - t v at
the steps m of --onestep_stages (one training stage each, in order), and fine-tune the one-step map z - f(z, 1)
to them with a pull towards the frozen initial EMA network. The run directory it writes has the teacher's
network (arch.json), so `trainers.evaluate` evaluates it like any other run.
"""
import dataclasses
import json
import os

from absl import app, flags

from trainers import common

FLAGS = flags.FLAGS
TRAJECTORIES = "trajectories.npz"


def define_flags():
    common.define_flags()
    t, d = common.define, flags
    t(d.DEFINE_string, "init_run_dir", None, "CUD run whose EMA weights start the training and stay frozen as f_EMA.")
    t(d.DEFINE_list, "onestep_stages", ["8", "11", "14"], "Steps m (of --onestep_grid_steps) whose x0_hat are the "
      "targets; one training stage per m, in this order.")
    t(d.DEFINE_integer, "onestep_grid_steps", 16, "N, the Euler steps of the stored trajectories.", lower_bound=1)
    t(d.DEFINE_integer, "onestep_num_pairs", 10000, "Stored trajectories (noise z and its targets).", lower_bound=1)
    t(d.DEFINE_float, "onestep_reg_weight", 0.1, "Weight of ||f(z,1) - f_EMA(z,1)||^2.", lower_bound=0.0)
    t(d.DEFINE_integer, "onestep_head", 1, "Head g_k of the one-step map (and of the trajectories).", lower_bound=1)
    t(d.DEFINE_integer, "onestep_gen_batch", 500, "Batch of the trajectory generation.", lower_bound=1)


def stage_bounds(train_steps, num_stages):
    """End step of each stage: the iterations are split evenly, the remainder going to the last stage."""
    per = train_steps // num_stages
    if per < 1:
        raise flags.ValidationError(f"--train_steps={train_steps} is fewer than the {num_stages} stages")
    return [per * (s + 1) for s in range(num_stages - 1)] + [train_steps]


def trajectory_targets(net, z, labels, stages, num_steps, head):
    """x0_hat^(m) = x_t - t v(x_t, t) at t = 1 - m/N of the N-step Euler trajectory from z, for m in `stages`.

    z `[B,H,W,C]`, labels `[B]` or None -> `[len(stages), B, H, W, C]`."""
    import tensorflow as tf
    from cud_tf import interpolants
    from cud_tf.sampling import velocity_fn

    v = velocity_fn(net, head, labels)
    x, out = z, {}
    for i in range(max(stages) + 1):
        t = 1.0 - i / num_steps
        if t <= 0.0:  # m = N: the endpoint itself
            out[i] = x
            break
        v_i = v(x, tf.fill(tf.shape(x)[:1], t))
        if i in stages:
            out[i] = interpolants.x0_from_v(x_t=x, v=v_i, t=t)
        x = x - v_i / num_steps
    return tf.stack([out[m] for m in stages])


def load_or_generate(run_dir, net, stages, image_shape, log):
    """{"z": `[P,H,W,C]`, "target": `[S,P,H,W,C]`, "label": `[P]`} stored in run_dir (generated on first use)."""
    import numpy as np
    import tensorflow as tf
    from cud_tf.training import TrainingError

    meta = dict(init_run_dir=os.path.abspath(FLAGS.init_run_dir), stages=list(stages),
                grid_steps=FLAGS.onestep_grid_steps, num_pairs=FLAGS.onestep_num_pairs, head=FLAGS.onestep_head,
                seed=FLAGS.seed)
    path = os.path.join(run_dir, TRAJECTORIES)
    if os.path.exists(path):
        with np.load(path) as f:
            stored = json.loads(str(f["meta"]))
            if stored != meta:
                raise TrainingError(f"{path} holds trajectories of other settings ({stored}); use a new --run_dir")
            return {k: f[k] for k in ("z", "target", "label")}
    conditional = net.config.num_classes > 0
    sig = [tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32)]
    gen = tf.function(lambda z, y: trajectory_targets(net, z, y if conditional else None, stages,
                                                      FLAGS.onestep_grid_steps, FLAGS.onestep_head),
                      input_signature=sig)
    p, bs = FLAGS.onestep_num_pairs, FLAGS.onestep_gen_batch
    labels = (np.arange(p) % net.config.num_classes if conditional else np.zeros(p)).astype(np.int32)
    zs, targets = [], []
    for i, start in enumerate(range(0, p, bs)):
        b = min(bs, p - start)
        z = tf.random.stateless_normal([b, *image_shape], seed=[FLAGS.seed, 7919 + i])
        zs.append(z.numpy())
        targets.append(gen(z, tf.constant(labels[start:start + b])).numpy())
    out = dict(z=np.concatenate(zs), target=np.concatenate(targets, axis=1), label=labels)
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=json.dumps(meta), **out)
    os.replace(tmp, path)
    log(f"stored {p} trajectories (targets at steps {list(stages)} of {FLAGS.onestep_grid_steps}) in {path}")
    return out


def make_dataset(pairs, stage, batch_size, seed, start_batch):
    """Shuffled, repeated batches {"z", "target", "label"} of stage `stage`, from batch `start_batch` on (resume):
    pass p's order is a pure function of (seed, stage, p)."""
    import tensorflow as tf

    n = len(pairs["z"])
    ds = tf.data.Dataset.from_tensor_slices(dict(z=pairs["z"], target=pairs["target"][stage], label=pairs["label"]))
    first = start_batch * batch_size
    base = tf.constant([seed, stage], tf.int64)

    def one_pass(p):
        pass_seed = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(base, p), None, None,
                                                tf.int64)
        return ds.shuffle(n, seed=pass_seed, reshuffle_each_iteration=False)

    out = tf.data.Dataset.counter(first // n).flat_map(one_pass).skip(first % n)
    return out.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def run(log=print):
    """Builds everything from the flags and trains stage after stage; returns the last metrics."""
    import keras
    import tensorflow as tf

    from cud_tf import training
    from cud_tf import run_dir as run_dir_lib
    from cud_tf.models.base import DiffusionModel
    from cud_tf.networks.unet import VelocityUNet
    from cud_tf.objectives import OBJECTIVES
    from cud_tf.objectives.onestep import OnestepConfig

    if not FLAGS.run_dir or not FLAGS.init_run_dir:
        raise flags.ValidationError("--run_dir (where to write) and --init_run_dir (a CUD run) are both required")
    if os.path.abspath(FLAGS.run_dir) == os.path.abspath(FLAGS.init_run_dir):
        raise flags.ValidationError("--run_dir must differ from --init_run_dir (the CUD run stays untouched)")
    stages = common.int_list(FLAGS.onestep_stages, "onestep_stages")
    if not stages or not all(1 <= m <= FLAGS.onestep_grid_steps for m in stages):
        raise flags.ValidationError(
            f"--onestep_stages={FLAGS.onestep_stages} must lie in 1..{FLAGS.onestep_grid_steps}")
    bounds = stage_bounds(FLAGS.train_steps, len(stages))
    init = run_dir_lib.load_run(FLAGS.init_run_dir)  # EMA weights
    cfg = init.config
    if FLAGS.onestep_head > cfg.num_heads:
        raise flags.ValidationError(f"--onestep_head={FLAGS.onestep_head} but {FLAGS.init_run_dir} has "
                                    f"{cfg.num_heads} head(s)")
    # flags.txt describes this run: the teacher's network and data.
    common.describe_network(cfg)
    FLAGS.sample_head = FLAGS.onestep_head
    for name in ("dataset", "data_dir"):
        if not FLAGS[name].present and name in init.flags:
            FLAGS[name].value = init.flags[name]
    try:
        os.makedirs(FLAGS.run_dir, exist_ok=True)
        common.write_flags(FLAGS.run_dir)
    except OSError as e:
        raise training.TrainingError(f"cannot write the run directory {FLAGS.run_dir}: {e.strerror}; "
                                     "choose a writable --run_dir") from None

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    pairs = load_or_generate(FLAGS.run_dir, init.net, stages, cfg.image_shape, log)
    strategy = training.make_strategy(FLAGS.strategy)
    if FLAGS.global_batch_size % strategy.num_replicas_in_sync:
        raise flags.ValidationError(f"--global_batch_size={FLAGS.global_batch_size} is not divisible by the "
                                    f"{strategy.num_replicas_in_sync} replicas")
    weights = init.net.get_weights()
    with strategy.scope():
        net = VelocityUNet(cfg, name="velocity").build_variables()
        net.set_weights(weights)
        f_ema = VelocityUNet(cfg, name="f_ema").build_variables()
        f_ema.set_weights(weights)
        f_ema.trainable = False
        objective_cfg = OnestepConfig(reg_weight=FLAGS.onestep_reg_weight, head=FLAGS.onestep_head)
        model = DiffusionModel(net, OBJECTIVES["onestep"], objective_cfg, common.optim_config(),
                               global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed,
                               nonfinite=FLAGS.nonfinite, extra_nets={"f_ema": f_ema},
                               jit_compile=FLAGS.jit_compile)
    arch = common.arch_dict(cfg, encoder=False)
    loop = common.loop_config()
    metrics, begin = {}, 0
    for s, end in enumerate(bounds):
        stage_begin = begin

        def dist_dataset(start, s=s, stage_begin=stage_begin):
            ds = make_dataset(pairs, s, FLAGS.global_batch_size, FLAGS.seed, start - stage_begin)
            return strategy.experimental_distribute_dataset(ds)

        if int(model.step.numpy()) < end:
            log(f"stage {s + 1}/{len(stages)}: targets x0_hat at step {stages[s]} of {FLAGS.onestep_grid_steps}, "
                f"iterations {begin}..{end}")
            metrics = training.train(model, strategy, dist_dataset, dataclasses.replace(loop, train_steps=end), arch,
                                     cfg.image_shape, log=log)
        begin = end
    return metrics


def main(argv):
    from cud_tf.run_dir import RunError
    from cud_tf.training import TrainingError
    common.run_or_fail(argv, run, TrainingError, RunError)


if __name__ == "__main__":
    define_flags()
    app.run(main)

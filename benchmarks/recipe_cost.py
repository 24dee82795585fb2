"""What each recipe under configs/ costs to train: parameters, FLOPs and A100-days.

    python benchmarks/recipe_cost.py [--flagfiles=configs/imagenet64.cfg,...] [--out=runs/recipe_cost.json]

For each flagfile (default: every one under configs/ that names a run, i.e. not an include-only base file):
- its network, as its trainer builds it: the flags' U-Net for trainers.cud; the teacher's for TRACT, DisBack and
  the one-step stage (the flagfile of configs/ whose --run_dir is the teacher run; --onestep_init for the one-step
  stage, whose run is passed on the command line), its parameter count (variables built, never trained);
- FLOPs of one forward pass at batch 1 (`F`) and of one training pass, forward and backward through the weights
  (`T`), counted on their graphs by the TF profiler (2 FLOPs per multiply-add). The profiler has no count for
  Einsum, the attention's two products: those are added from each Einsum's equation and shapes;
- FLOPs per iteration and image: the passes the recipe's objective makes, counted from its code (`passes`), times
  T and F; the run's FLOPs (iterations x global batch, and what a stage spends outside its iterations), and
  A100-days at an assumed dense fp16/bf16 peak of 312 TFLOP/s and 40% utilisation (the same for every row).

Prints JSON and a markdown table (docs/recipes.md).
"""
import functools
import glob
import json
import math
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainers import common  # noqa: E402

FLAGS = flags.FLAGS
PEAK_FLOPS = 312e12  # A100 dense fp16/bf16 tensor cores
UTILISATION = 0.4


def define_flags():
    """The benchmark's own flags (with the trainers' flags, which the flagfiles set)."""
    flags.DEFINE_list("flagfiles", [], "Recipes to cost (default: every flagfile under configs/ with a --run_dir).")
    flags.DEFINE_string("onestep_init", "configs/mnist_quick.cfg", "The CUD recipe whose run a one-step recipe "
                        "starts from (its --init_run_dir).")
    flags.DEFINE_string("out", "", "Write the JSON here too.")


def einsum_flops(graph):
    """2 x the multiply-adds of every Einsum op of `graph` (static shapes): the product of its index sizes."""
    total = 0
    for op in graph.get_operations():
        if op.type != "Einsum":
            continue
        equation = op.get_attr("equation").decode()
        if "." in equation:
            raise ValueError(f"cannot count Einsum {equation!r} (ellipsis)")
        sizes = {}
        for spec, tensor in zip(equation.split("->")[0].split(","), op.inputs):
            sizes.update(zip(spec, tensor.shape.as_list()))
        total += 2 * math.prod(sizes.values())
    return total


def graph_flops(concrete):
    """FLOPs of one call of a concrete function: the TF profiler's count plus `einsum_flops`."""
    import tensorflow as tf
    nested = {op.type for op in concrete.graph.get_operations()} & {"PartitionedCall", "StatefulPartitionedCall",
                                                                     "While", "StatelessWhile"}
    if nested:
        raise ValueError(f"the graph calls functions the profiler does not look into: {sorted(nested)}")
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    counted = tf.compat.v1.profiler.profile(graph=concrete.graph, options=opts).total_float_ops
    return int(counted) + einsum_flops(concrete.graph)


@functools.lru_cache(maxsize=None)
def network_costs(net_cfg):
    """{params, forward, train}: parameters, FLOPs of a forward pass (inference mode, head 1) and of a training
    pass (training mode, every head, gradient of their sum with respect to the weights), at batch 1. Cached per
    UNetConfig (a teacher serves several recipes)."""
    import tensorflow as tf
    from cud_tf.networks.unet import VelocityUNet
    net = VelocityUNet(net_cfg).build_variables()
    x = tf.TensorSpec([1, *net_cfg.image_shape], tf.float32)
    t = tf.TensorSpec([1], tf.float32)
    y = tf.TensorSpec([1], tf.int32) if net_cfg.num_classes else None

    def forward(x, t, y=None):
        return net(x, t, y, training=False, head=1)

    def train(x, t, y=None):
        with tf.GradientTape() as tape:
            loss = tf.add_n([tf.reduce_sum(v) for v in net(x, t, y, training=True)])
        return tape.gradient(loss, net.trainable_variables)

    specs = (x, t, y) if y is not None else (x, t)
    return dict(params=net.count_params(), forward=graph_flops(tf.function(forward).get_concrete_function(*specs)),
                train=graph_flops(tf.function(train).get_concrete_function(*specs)))


def parse(path):
    """Parses flagfile `path` (relative to the repository) into FLAGS; returns its trainer."""
    return common.flagfile_trainer(os.path.join(ROOT, path))


def run_dirs():
    """{--run_dir: flagfile} over configs/."""
    out = {}
    for path in recipe_files():
        parse(path)
        out[os.path.normpath(FLAGS.run_dir)] = path
    return out


def recipe_files():
    """Every flagfile under configs/ that names a run (the others are bases that recipes include)."""
    paths = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.cfg")))
    named = []
    for path in paths:
        parse(path)
        if FLAGS.run_dir:
            named.append(path)
    return named


def cud_network(path):
    """(UNetConfig, noise encoder on) of CUD recipe `path`, as trainers.cud builds them."""
    from trainers import cud as cud_trainer
    assert parse(path) == "cud", path
    return cud_trainer.network_config(), FLAGS.noise_encoder


def cud_passes(dropout):
    """{trained, encoder, forward} per image of a CUD (or RF) iteration: the prediction pass; the noise encoder's
    pass; the catch-up slope's RK stages (the first taken from the prediction where that is exact or asked for)
    and the K target points, one batched pass of K*B images."""
    from cud_tf import solvers
    from cud_tf.objectives import cud
    from trainers import cud as cud_trainer
    obj = cud_trainer.objective_config(0)
    forward = 0
    if FLAGS.method == "cud":
        stages = len(solvers.get_tableau(obj.tableau or solvers.ORDER_TO_TABLEAU[obj.order]).needed_stages)
        forward = stages - (1 if cud.reuses_prediction(obj, dropout) else 0) + obj.order
    return dict(trained=1, encoder=1 if FLAGS.noise_encoder else 0, forward=forward)


def cost(path, teachers, onestep_init):
    """The cost record of recipe `path`; `teachers`: {--run_dir: flagfile}; `onestep_init`: the flagfile of a
    one-step recipe's initial CUD run."""
    from cud_tf.networks.unet import noise_encoder_config
    trainer = parse(path)
    note = ""
    once = 0.0  # FLOPs outside the iterations (one-step trajectories), in units of F
    stage1 = 0  # DisBack stage-1 steps
    if trainer == "cud":
        net_cfg, encoder = cud_network(path)
        parse(path)
        passes = cud_passes(net_cfg.dropout)
        teacher = None
    else:
        teacher_dir = {"tract": "tract_teacher_run_dir", "disback": "disback_teacher_run_dir"}.get(trainer)
        teacher = teachers[os.path.normpath(FLAGS[teacher_dir].value)] if teacher_dir else onestep_init
        net_cfg, _ = cud_network(teacher)
        encoder = False
        parse(path)
        if trainer == "tract":  # student pass; the teacher's step (Euler 1, Heun 2) and the jump to the group end
            stages = {"euler": 1, "heun": 2}[FLAGS.tract_teacher_solver]
            guided = 2 if FLAGS.tract_teacher_guidance != 1.0 else 1  # phase 0 only: an upper bound
            second = 1 if FLAGS.tract_second_step == "self_teacher" else stages * guided
            passes = dict(trained=1, encoder=0, forward=stages * guided + second)
        elif trainer == "disback":
            # Stage 2, per iteration: the fake net's RF fit (trained) on generator samples. On one iteration of every
            # r (r = --disback_fake_updates) the generator is trained too (its one-step pass, trained), with the
            # fake's and the target's velocities (forward; the target twice when guided); on the others the
            # generator's pass is a forward one. Averaged over r.
            r = FLAGS.disback_fake_updates
            target = 2 if FLAGS.disback_guidance != 1.0 else 1
            passes = dict(trained=1 + 1 / r, encoder=0, forward=(1 + target) / r + (r - 1) / r)
            if FLAGS.disback_path == "on":  # stage 1: G0's forward pass and the degradation net's RF fit
                stage1 = FLAGS.disback_num_nodes * FLAGS.disback_record_every
            note = "stage 2 per iteration; stage 1 (1 trained + 1 forward) in the run total"
        else:  # onestep: the student's pass and f_EMA's; the stored trajectories are generated once
            passes = dict(trained=1, encoder=0, forward=1)
            once = FLAGS.onestep_num_pairs * FLAGS.onestep_grid_steps
            note = f"+ {FLAGS.onestep_num_pairs:,} trajectories of {FLAGS.onestep_grid_steps} Euler steps"
    costs = network_costs(net_cfg)
    enc_costs = network_costs(noise_encoder_config(net_cfg)) if encoder else None
    per_image = (passes["trained"] * costs["train"] + passes["forward"] * costs["forward"]
                 + (passes["encoder"] * enc_costs["train"] if enc_costs else 0))
    images = FLAGS.train_steps * FLAGS.global_batch_size
    total = (per_image * images + stage1 * FLAGS.global_batch_size * (costs["train"] + costs["forward"])
             + once * costs["forward"])
    return dict(flagfile=path, trainer=trainer, teacher=teacher, dataset=FLAGS.dataset,
                image_shape=list(net_cfg.image_shape), num_classes=net_cfg.num_classes, params=costs["params"],
                encoder_params=enc_costs["params"] if enc_costs else 0, forward_flops=costs["forward"],
                train_pass_flops=costs["train"], encoder_train_pass_flops=enc_costs["train"] if enc_costs else 0,
                passes=passes, iteration_flops_per_image=per_image, train_steps=FLAGS.train_steps,
                global_batch_size=FLAGS.global_batch_size, stage1_steps=stage1, total_flops=total,
                a100_days=total / (PEAK_FLOPS * UTILISATION) / 86400, note=note)


def markdown(results):
    g = 1e9
    lines = ["| recipe | trainer | network | parameters | forward GFLOP | train pass GFLOP | passes per image | "
             "GFLOP per iteration-image | steps x batch | run FLOP | A100-days |",
             "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|"]
    for r in results:
        p = r["passes"]
        passes = f"{p['trained']:g} T + {p['forward']:g} F" + (f" + {p['encoder']:g} T_enc" if p["encoder"] else "")
        network = "x".join(map(str, r["image_shape"])) + (f", {r['num_classes']} classes" if r["num_classes"] else "")
        if r["teacher"]:
            network += f" (teacher: {os.path.basename(r['teacher'])})"
        params = f"{r['params']:,}" + (f" + {r['encoder_params']:,} enc." if r["encoder_params"] else "")
        days = f"{r['a100_days']:.3g}" if r["a100_days"] >= 0.01 else "< 0.01"
        lines.append(f"| {os.path.basename(r['flagfile'])} | {r['trainer']} | {network} | {params} | "
                     f"{r['forward_flops'] / g:.3g} | {r['train_pass_flops'] / g:.3g} | {passes} | "
                     f"{r['iteration_flops_per_image'] / g:.4g} | {r['train_steps']:,} x {r['global_batch_size']} | "
                     f"{r['total_flops']:.2e} | {days} |")
    notes = [f"- {os.path.basename(r['flagfile'])}: {r['note']}" for r in results if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv):
    del argv
    import tensorflow as tf
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # the v1 profiler's deprecation notices
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})  # graphs are only counted
    os.chdir(ROOT)  # flagfiles include their base files by paths relative to the repository
    paths, onestep_init, out = list(FLAGS.flagfiles), FLAGS.onestep_init, FLAGS.out  # parsing resets FLAGS
    teachers = run_dirs()
    paths = paths or recipe_files()
    results = []
    for path in paths:
        results.append(cost(path, teachers, onestep_init))
        print(f"{path}: {results[-1]['iteration_flops_per_image'] / 1e9:.4g} GFLOP per iteration-image",
              file=sys.stderr, flush=True)
    report = dict(peak_flops=PEAK_FLOPS, utilisation=UTILISATION, recipes=results)
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    print(markdown(results))


if __name__ == "__main__":
    define_flags()
    common.own_flags()  # every trainer's flags, so that each flagfile parses
    app.run(main)

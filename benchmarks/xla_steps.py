"""Graph mode against XLA for each kind of train step, and why two step kinds used to be slower under XLA.

    python benchmarks/xla_steps.py --flagfile=configs/mnist_quick.cfg --out=runs/xla_steps.json

Part 1, the cause (ops alone, batch 64 of 28x28x32): each op in a graph-mode tf.cond, in an XLA computation, and in
an XLA computation whose tf.cond holds it. On CPU, XLA runs convolution *gradients* inside a conditional's branch
far slower than the same gradients outside one (forward convolutions, matmuls and GroupNorm are not affected):
DisBack's stage-2 step used to be one XLA computation holding the generator/fake-only cond, so its every step paid
that. Its two kinds of step are now separate XLA computations chosen by a graph-mode cond
(`cud_tf.models.disback.DisbackModel.losses_and_grads`). TRACT's XLA step recompiled on every call instead (the
phase's step counts were a strided slice, whose bounds XLA must know at compile time; now a gather): part 2
times it at steps of several phases, which is where a recompile would show.

Part 2, the steps (the network and --global_batch_size of --flagfile; dropout off): the median seconds of a
train step's losses and gradients (what `cud_tf.execution.choose_xla` times) in graph mode and under XLA for
RF, CUD K=1, TRACT and DisBack (its generator and fake-only steps, and the old single-computation layout), and
what the default (`--jit_compile` unset) picks: `cud_tf.execution.choose_xla`, the trainers' own probe, run
--probes times on an empty cache, with the time of its worst pick over the better mode's ("default / best").
The reference is itself a sample of a noisy machine: its 95% interval of XLA / graph says when it can rank the
modes at all (an interval across 1 within 0.95-1.05 means a near-tie, where either pick is within 5%).
Prints JSON and a markdown table.
"""
import dataclasses
import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainers import common, cud as cud_trainer  # noqa: E402  (the network flags, which --flagfile sets)

FLAGS = flags.FLAGS
cud_trainer.define_flags()
flags.DEFINE_integer("steps", 5, "Timed calls per measurement (the median is reported).", lower_bound=1)
flags.DEFINE_list("parts", ["ops", "steps"], "Which parts to run.")
flags.DEFINE_boolean("old_disback", True, "Also time DisBack's old layout (the cond inside one XLA computation; "
                     "~15 s a step on the quickstart net on 2 cores).")
flags.DEFINE_integer("probes", 3, "Runs of the default's probe per step kind, each on an empty cache (0: none).",
                     lower_bound=0)
KINDS = ("rf", "cud1", "tract", "disback")
flags.DEFINE_list("kinds", list(KINDS), "Which steps the steps part times.")
flags.register_validator("kinds", lambda v: set(v) <= set(KINDS), f"--kinds takes some of {','.join(KINDS)}")
flags.DEFINE_string("out", "", "Write the JSON here too.")


def side_by_side(fns, args_list):
    """{name: median wall seconds of fns[name](*args)} (results fetched) over args_list[1:], after an untimed call
    on args_list[0] (tracing, XLA compilation); the functions are called in turn for each args
    (`cud_tf.execution.interleaved_times`), so a change of machine load weighs on each alike. With names "graph"
    and "xla", also "xla_over_graph_95": the 95% interval of XLA / graph from the rounds' paired log-ratios (how
    far this reference itself can be trusted to rank the modes)."""
    import numpy as np
    from cud_tf import execution
    calls = {name: (lambda fn=fn, it=iter(args_list): fn(*next(it))) for name, fn in fns.items()}
    times = execution.interleaved_times(calls, steps=len(args_list) - 1, warmup=1)
    row = {name: float(np.median(t)) for name, t in times.items()}
    if set(times) == {"graph", "xla"} and len(args_list) > 2:
        mean, se = execution.paired_log_ratio(times["xla"], times["graph"])
        row["xla_over_graph_95"] = [float(np.exp(mean - 1.96 * se)), float(np.exp(mean + 1.96 * se))]
    return row


def ops_part():
    """{op: {graph_cond, xla, xla_cond_inside}} seconds."""
    import tensorflow as tf
    x = tf.random.stateless_normal([64, 28, 28, 32], [0, 1])
    w = tf.Variable(tf.random.stateless_normal([3, 3, 32, 32], [0, 2]))
    strides, pad = [1, 1, 1, 1], "SAME"

    def groupnorm(v):
        h = tf.reshape(v, [64, 28, 28, 4, 8])
        mean, var = tf.nn.moments(h, [1, 2, 4], keepdims=True)
        return tf.reshape((h - mean) * tf.math.rsqrt(var + 1e-5), [64, 28, 28, 32])

    def grad_of(f, weights=()):
        def g(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(tf.square(f(v)))
            return tape.gradient(loss, [v, *weights])
        return g

    conv = lambda v: tf.nn.conv2d(v, w, 1, pad)  # noqa: E731
    a = tf.random.stateless_normal([1024, 1024], [0, 3])
    cases = {
        "conv forward": (conv, x),
        "Conv2DBackpropInput": (lambda v: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(v), filter=w, out_backprop=v, strides=strides, padding=pad), x),
        "Conv2DBackpropFilter": (lambda v: tf.raw_ops.Conv2DBackpropFilter(
            input=v, filter_sizes=tf.shape(w), out_backprop=v, strides=strides, padding=pad), x),
        "conv forward + backward": (grad_of(conv, [w]), x),
        "matmul 1024^2": (lambda v: tf.matmul(v, v), a),
        "GroupNorm forward + backward": (grad_of(groupnorm), x),
    }
    p = tf.constant(True)
    rows = {}
    for name, (f, arg) in cases.items():
        in_cond = lambda v, q, f=f: tf.cond(q, lambda: f(v), lambda: f(2.0 * v))  # noqa: E731
        fns = {"graph_cond": tf.function(in_cond), "xla": tf.function(lambda v, q, f=f: f(v), jit_compile=True),
               "xla_cond_inside": tf.function(in_cond, jit_compile=True)}
        rows[name] = side_by_side(fns, [(arg, p)] * (FLAGS.steps + 1))
        print(json.dumps({name: rows[name]}), flush=True)
    return rows


def default_picks(model, batch):
    """[XLA on?] of --probes runs of what `--jit_compile` unset runs (`cud_tf.execution.choose_xla` on the default
    strategy), each with an empty cache of choices."""
    import tempfile

    import tensorflow as tf
    from cud_tf import execution
    picks, before = [], os.environ.get("CUD_TF_CACHE")
    strategy = tf.distribute.get_strategy()
    try:
        for _ in range(FLAGS.probes):
            with tempfile.TemporaryDirectory() as cache:
                os.environ["CUD_TF_CACHE"] = cache
                choice = execution.choose_xla(model, strategy, batch, log=lambda _: None)
                picks.append(choice["xla"])
                print(json.dumps(dict(probe={k: choice[k] for k in ("xla", "graph_s", "xla_s", "rounds")})),
                      flush=True)
    finally:
        if before is None:
            os.environ.pop("CUD_TF_CACHE", None)
        else:
            os.environ["CUD_TF_CACHE"] = before
    return picks


def with_default(row, picks):
    """Adds the default's picks and its worst pick's time over the better mode's to a {graph, xla} row."""
    if picks:
        worst = max(row["xla" if xla else "graph"] for xla in picks)
        row.update(default_xla=picks, default_over_best=worst / min(row["graph"], row["xla"]))
    return row


def steps_part():
    """{step kind: {graph, xla, ...}} seconds of one step's losses and gradients."""
    import tensorflow as tf
    from cud_tf.models.base import DiffusionModel, OptimConfig
    from cud_tf.models.disback import DisbackModel
    from cud_tf.models.tract import TractModel
    from cud_tf.networks.unet import VelocityUNet
    from cud_tf.objectives import OBJECTIVES, ObjectiveConfig, disback, tract

    cfg = common.network_config((28, 28, 1), num_classes=0)
    cfg = dataclasses.replace(cfg, dropout=0.0)
    b = FLAGS.global_batch_size
    batch = {"image": tf.random.stateless_uniform([b, 28, 28, 1], [0, 4], -1.0, 1.0), "label": tf.zeros([b], tf.int32)}
    nets = lambda *names: [VelocityUNet(cfg, name=n).build_variables() for n in names]  # noqa: E731
    optim = OptimConfig()
    models = {
        "rf": DiffusionModel(*nets("velocity"), OBJECTIVES["rf"], ObjectiveConfig(), optim, b),
        "cud1": DiffusionModel(*nets("velocity"), OBJECTIVES["cud"], ObjectiveConfig(order=1), optim, b),
        # steps_per_phase=2: the timed steps 1..5 span three phases (a recompile per phase or step would show).
        "tract": TractModel(*nets("velocity", "teacher", "self"),
                            tract.TractConfig(schedule=(64, 16, 4, 1), steps_per_phase=2), optim, b),
    }
    # The replica id is a tensor, as the train step passes it.
    steps = [(batch, tf.constant(k, tf.int64), tf.constant(0), 1) for k in range(FLAGS.steps + 1)]
    rows = {}
    for name, model in ((n, m) for n, m in models.items() if n in FLAGS.kinds):
        fns = {("xla" if xla else "graph"): tf.function(model.objective_step(model.objective, xla=xla))
               for xla in (False, True)}
        rows[name] = with_default(side_by_side(fns, steps), default_picks(model, batch))
        print(json.dumps({name: rows[name]}), flush=True)
    if "disback" not in FLAGS.kinds:
        return rows
    gen_net, fake_net, target = nets("velocity", "fake", "target")
    model = DisbackModel(gen_net, fake_net, target, disback.DisbackConfig(fake_updates_per_generator=5), optim, b)
    gen_step = {xla: model.objective_step(disback.loss, xla=xla) for xla in (False, True)}
    fake_step = {xla: model.objective_step(disback.fake_loss, xla=xla) for xla in (False, True)}
    picks = default_picks(model, batch)  # one choice for both kinds, from their mean weighted 1 : ratio - 1
    for kind, fns in (("disback generator step", gen_step), ("disback fake-only step", fake_step)):
        rows[kind] = with_default(side_by_side({("xla" if xla else "graph"): tf.function(fn)
                                                for xla, fn in fns.items()}, steps), picks)
        print(json.dumps({kind: rows[kind]}), flush=True)
    ratio = model.objective_cfg.fake_updates_per_generator
    rows[f"disback iteration (1 generator : {ratio - 1} fake-only)"] = with_default(
        {mode: (rows["disback generator step"][mode] + (ratio - 1) * rows["disback fake-only step"][mode]) / ratio
         for mode in ("graph", "xla")}, picks)
    if FLAGS.old_disback:  # steps 0..2 take the fake-only branch: one XLA computation holding the cond
        old = tf.function(lambda *a: tf.cond(model.is_generator_step(a[1]), lambda: gen_step[False](*a),
                                             lambda: fake_step[False](*a)), jit_compile=True)
        rows["disback fake-only step"]["xla_cond_inside"] = side_by_side({0: old}, steps[:3])[0]
        print(json.dumps({"disback fake-only step": rows["disback fake-only step"]}), flush=True)
    return rows


def table(result):
    lines = []
    if "ops" in result:
        lines += ["| op (batch 64, 28x28x32) | graph, in a cond | XLA | XLA, in a cond inside | slowdown |",
                  "|---|---|---|---|---|"]
        for name, r in result["ops"].items():
            lines.append(f"| {name} | {r['graph_cond'] * 1e3:.1f} ms | {r['xla'] * 1e3:.1f} ms | "
                         f"{r['xla_cond_inside'] * 1e3:.1f} ms | {r['xla_cond_inside'] / r['xla']:.1f}x |")
        lines.append("")
    if "steps" in result:
        lines += [f"| step's losses and gradients (batch {FLAGS.global_batch_size}) | graph | XLA | XLA / graph | "
                  "95% interval | old layout (cond inside XLA) | default picks | default / best |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in result["steps"].items():
            old = f"{r['xla_cond_inside'] * 1e3:.0f} ms" if "xla_cond_inside" in r else "-"
            picks = r.get("default_xla", [])
            chosen = (f"XLA {sum(picks)}/{len(picks)}, graph {len(picks) - sum(picks)}/{len(picks)}" if picks
                      else "-")
            ratio = f"{r['default_over_best']:.3f}" if picks else "-"
            interval = "{:.2f}-{:.2f}".format(*r["xla_over_graph_95"]) if "xla_over_graph_95" in r else "-"
            lines.append(f"| {name} | {r['graph'] * 1e3:.0f} ms | {r['xla'] * 1e3:.0f} ms | "
                         f"{r['xla'] / r['graph']:.2f} | {interval} | {old} | {chosen} | {ratio} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a --flag")
    import tensorflow as tf
    from cud_tf import precision
    result = dict(machine=dict(precision.bf16_hardware(), tf=tf.__version__))
    if "ops" in FLAGS.parts:
        result["ops"] = ops_part()
    if "steps" in FLAGS.parts:
        result["steps"] = steps_part()
    print(json.dumps(result, indent=1))
    print(table(result))
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)

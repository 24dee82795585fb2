"""Training and sampling speed on this machine, in one process so that ratios are fair.

    python benchmarks/speed.py --out=runs/speed.json
    python benchmarks/speed.py --flagfiles=configs/mnist.cfg --methods=rf,cud1+enc --steps=10

For each flagfile's network (default: the quickstart net and the MNIST paper net of docs/algorithms.md section 4):
- train-step images/s at --batch_size for rectified flow and CUD K = 1, 2, 3 with and without the noise encoder
  (median of --steps timed steps after --warmup), each CUD step's time over the RF step's, and the ideal ratio
  from the network passes it makes (measured costs: one RF step, one forward pass of the batch);
- FLOPs per step counted from the step's graph (TF profiler) and the achieved GFLOP/s as a fraction of the fp32
  and bf16 matmul peak measured in the same process;
- sampling images/s at NFE 1 and 8, batch 1 and --batch_size; the input pipeline alone;
- float32 against mixed_bfloat16 (--bf16_methods: the RF and CUD K = 1 steps by default), each in graph mode and
  under XLA, beside the CPU's bf16 instructions (avx512_bf16, amx_bf16) or the GPU's compute capability: what
  --precision=auto decides between (cud_tf.precision). Prints JSON and a markdown table.
"""
import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainers import common, cud as cud_trainer  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's own flags (with the trainers' shared flags, which the flagfiles set)."""
    flags.DEFINE_list("flagfiles", ["configs/mnist_quick.cfg", "configs/mnist.cfg"], "Networks to measure.")
    flags.DEFINE_integer("batch_size", 128, "Batch of every train step and of the batched sampler.", lower_bound=1)
    flags.DEFINE_integer("steps", 10, "Timed steps per measurement (the median is reported).", lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, XLA compilation).", lower_bound=1)
    flags.DEFINE_list("methods", ["rf", "cud1", "cud2", "cud3", "rf+enc", "cud1+enc", "cud2+enc", "cud3+enc"],
                      "Train steps to time: rf or cudK, '+enc' with the noise encoder.")
    flags.DEFINE_list("graph_methods", ["rf", "cud1"], "Also timed without XLA (the main rows follow --jit_compile).")
    flags.DEFINE_list("bf16_methods", ["rf", "cud1"], "Timed under float32 and mixed_bfloat16, each in graph mode "
                      "and with XLA.")
    flags.DEFINE_boolean("precision_only", False, "Time only the --bf16_methods rows (float32 vs mixed_bfloat16, "
                         "graph and XLA): what --precision=auto decides between.")
    flags.DEFINE_string("out", "", "Write the JSON here too.")
    flags.DEFINE_string("profile_dir", "", "Write a TF profiler trace of 3 RF steps of each network here "
                        "(TensorBoard's Profile tab with tensorboard-plugin-profile).")


MATMUL_N = 2048


def median_seconds(fn, steps, warmup):
    """Median wall seconds of `fn()` (every output fetched) over `steps` calls after `warmup` calls."""
    from cud_tf import execution
    for _ in range(warmup):
        execution.fetch(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        execution.fetch(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype):
    """GFLOP/s of a 2048^3 matmul in graph mode (median)."""
    import tensorflow as tf
    a = tf.random.normal([MATMUL_N, MATMUL_N], dtype=tf.float32)
    a = tf.cast(a, dtype)
    fn = tf.function(lambda: tf.reduce_sum(tf.cast(tf.linalg.matmul(a, a), tf.float32)))
    seconds = median_seconds(fn, 10, 2)
    return 2 * MATMUL_N ** 3 / seconds / 1e9


def blas_peak():
    """GFLOP/s of a 2048^3 float32 matmul through numpy's BLAS (median): TF's own Eigen matmul reaches only ~2/3
    of what this CPU can do, so the fp32 peak is the best of the two."""
    import numpy as np
    a = np.random.default_rng(0).standard_normal([MATMUL_N, MATMUL_N], dtype=np.float32)
    return 2 * MATMUL_N ** 3 / median_seconds(lambda: a @ a, 10, 2) / 1e9


def cpu_bf16_support():
    """The CPU's bf16 instructions (avx512_bf16, amx_bf16) from /proc/cpuinfo; [] without them or off Linux."""
    from cud_tf import precision
    try:
        with open("/proc/cpuinfo") as f:
            return precision.bf16_cpu_flags(f.read())
    except OSError:
        return []


def graph_flops(concrete):
    """Floating-point operations of one call of a concrete function, from its graph (TF profiler)."""
    import tensorflow as tf
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=concrete.graph, options=opts).total_float_ops)


def parse_method(name):
    """'cud2+enc' -> ('cud', 2, True)."""
    enc = name.endswith("+enc")
    base = name[:-4] if enc else name
    if base == "rf":
        return "rf", 1, enc
    if base.startswith("cud") and base[3:].isdigit() and 1 <= int(base[3:]) <= 4:
        return "cud", int(base[3:]), enc
    raise flags.ValidationError(f"unknown method {name!r}; expected rf or cudK (K = 1..4), optionally with +enc")


def objective_config(net_cfg, order):
    """The flagfile's objective options with catch-up order K = `order`."""
    import dataclasses
    return dataclasses.replace(cud_trainer.objective_config(net_cfg.num_classes), order=order)


def build_model(net_cfg, method, order, enc, jit_compile):
    import dataclasses

    import keras
    from cud_tf.models.cud import CudModel
    from cud_tf.networks.unet import VelocityUNet, noise_encoder_config
    from cud_tf.objectives import OBJECTIVES
    keras.utils.set_random_seed(0)
    cfg = dataclasses.replace(net_cfg, num_heads=order)
    net = VelocityUNet(cfg).build_variables()
    encoder = VelocityUNet(noise_encoder_config(cfg)).build_variables() if enc else None
    return CudModel(net, OBJECTIVES[method], objective_config(cfg, order), common.optim_config(),
                    global_batch_size=FLAGS.batch_size, encoder=encoder, jit_compile=jit_compile)


def step_flops(net_cfg, name, batch):
    """FLOPs of one train step of method `name`, counted on its graph (XLA hides the ops of a compiled step)."""
    import tensorflow as tf
    method, order, enc = parse_method(name)
    model = build_model(net_cfg, method, order, enc, jit_compile=False)
    strategy = tf.distribute.get_strategy()
    return graph_flops(tf.function(lambda: strategy.run(model.train_step, args=(batch,))).get_concrete_function())


def time_train_step(net_cfg, name, batch, jit_compile=True, profile_dir="", split=False):
    """{img_per_s, seconds} of one train step of method `name` (median); with `split`, also its forward +
    backward alone (the step without the all-reduce and update)."""
    import tensorflow as tf

    from cud_tf import execution
    method, order, enc = parse_method(name)
    model = build_model(net_cfg, method, order, enc, jit_compile)
    strategy = tf.distribute.get_strategy()
    step = tf.function(lambda: strategy.run(model.train_step, args=(batch,)))
    seconds = median_seconds(step, FLAGS.steps, FLAGS.warmup)
    out = dict(img_per_s=FLAGS.batch_size / seconds, seconds=seconds)
    if profile_dir:
        tf.profiler.experimental.start(profile_dir)
        for _ in range(3):
            execution.fetch(step())
        tf.profiler.experimental.stop()
    if split:
        grads = tf.function(lambda: model.losses_and_grads(batch, tf.constant(0, tf.int64), tf.constant(0), 1))
        out["forward_backward_seconds"] = median_seconds(grads, FLAGS.steps, FLAGS.warmup)
    return out


def ideal_passes(method, enc, obj_cfg, dropout):
    """(training passes with a gradient, forward passes of the batch without one) of a step, from the
    objective: the prediction (+ the noise encoder), then the catch-up slope's stages and the K target points."""
    from cud_tf import solvers
    from cud_tf.objectives import cud
    trained = 1 + (1 if enc else 0)
    if method == "rf":
        return trained, 0
    order = obj_cfg.order
    stages = len(solvers.get_tableau(obj_cfg.tableau or solvers.ORDER_TO_TABLEAU[order]).needed_stages)
    return trained, stages - (1 if cud.reuses_prediction(obj_cfg, dropout) else 0) + order


def sampling_rates(net, image_shape):
    """{f"nfe{n}_batch{b}": img/s} of the fixed-step Euler sampler (one XLA-compiled function per batch)."""
    import tensorflow as tf
    from cud_tf import sampling
    rates = {}
    for b in (1, FLAGS.batch_size):
        z = tf.random.normal([b, *image_shape])
        fn = tf.function(lambda n: sampling.generate(net, z, n), jit_compile=True)
        for n in (1, 8):
            rates[f"nfe{n}_batch{b}"] = b / median_seconds(lambda: fn(tf.constant(n)), FLAGS.steps, 2)
    return rates


def input_pipeline_rate(dcfg):
    """Images/s of the training input pipeline alone (decode, scale, shuffle, batch), without the trainers' op
    determinism (benchmarks/input_pipeline.py compares the two)."""
    from cud_tf import data
    it = iter(data.make_dataset(dcfg, FLAGS.batch_size, 0))
    for _ in range(5):
        next(it)
    n, t0 = 50, time.perf_counter()
    for _ in range(n):
        next(it)
    return n * FLAGS.batch_size / (time.perf_counter() - t0)


def measure_network(flagfile, peaks, bench_flags):
    import tensorflow as tf
    from cud_tf import data
    from cud_tf.networks.unet import VelocityUNet
    FLAGS.unparse_flags()
    FLAGS([sys.argv[0], f"--flagfile={os.path.join(ROOT, flagfile)}"])
    for k, v in bench_flags.items():  # the flagfile sets the network; the benchmark keeps its own settings
        FLAGS[k].value = v
    dcfg = common.data_config()
    shape = data.image_shape(dcfg)
    net_cfg = common.network_config(shape, num_heads=1, num_classes=max(FLAGS.num_classes, 0))
    rs = tf.random.stateless_uniform([FLAGS.batch_size, *shape], seed=[1, 2], minval=-1, maxval=1)
    batch = {"image": rs, "label": tf.zeros([FLAGS.batch_size], tf.int32)}
    params = VelocityUNet(net_cfg).build_variables().count_params()
    result = dict(flagfile=flagfile, params=params, batch_size=FLAGS.batch_size, jit_compile=FLAGS.jit_compile,
                  train={}, train_graph={}, precision={})
    if FLAGS.precision_only:
        for name in FLAGS.bf16_methods:
            result["precision"][name] = precision_rows(net_cfg, name, batch)
        return result
    net = VelocityUNet(net_cfg).build_variables()
    fwd_graph = tf.function(lambda x: net(x, tf.fill([FLAGS.batch_size], 0.5), training=False, head=1))
    fwd = tf.function(fwd_graph.python_function, jit_compile=True)
    t_fwd = median_seconds(lambda: fwd(rs), FLAGS.steps, FLAGS.warmup)
    result["forward_img_per_s"] = FLAGS.batch_size / t_fwd
    # FLOPs from the graph for the forward pass and the RF steps; a CUD step adds its forward passes to them.
    result["forward_flops"] = graph_flops(fwd_graph.get_concrete_function(rs))
    result["forward_img_per_s_at_fp32_peak"] = peaks["fp32"] * 1e9 / (result["forward_flops"] / FLAGS.batch_size)
    base_flops = {}
    for name in FLAGS.methods:
        profile = os.path.join(FLAGS.profile_dir, os.path.basename(flagfile)) if FLAGS.profile_dir and name == "rf" \
            else ""
        method, order, enc = parse_method(name)
        if ("rf", enc) not in base_flops:
            base_flops[("rf", enc)] = step_flops(net_cfg, "rf+enc" if enc else "rf", batch)
        r = time_train_step(net_cfg, name, batch, jit_compile=FLAGS.jit_compile, profile_dir=profile,
                            split=name == "rf")
        trained, forward = ideal_passes(method, enc, objective_config(net_cfg, order), net_cfg.dropout)
        r["passes"] = dict(trained=trained, forward=forward)
        r["flops"] = base_flops[("rf", enc)] + forward * result["forward_flops"]
        r["gflops_per_s"] = r["flops"] / r["seconds"] / 1e9
        r["fraction_of_fp32_peak"] = r["gflops_per_s"] / peaks["fp32"]
        r["img_per_s_at_fp32_peak"] = peaks["fp32"] * 1e9 / (r["flops"] / FLAGS.batch_size)  # the ceiling
        result["train"][name] = r
        print(f"{flagfile} {name}: {r['img_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    rf = result["train"].get("rf")
    if rf:
        for name, r in result["train"].items():
            _, _, enc = parse_method(name)
            base = result["train"].get("rf+enc") if enc else rf
            r["ratio_to_rf"] = r["seconds"] / rf["seconds"]
            r["flop_ratio_to_rf"] = r["flops"] / base_flops[("rf", False)]
            # Ideal: the RF step (with the encoder's pass when +enc, so only when rf+enc was timed) plus the
            # step's extra forward passes.
            if base is not None:
                r["ideal_ratio_to_rf"] = (base["seconds"] + r["passes"]["forward"] * t_fwd) / rf["seconds"]
        # Of the RF step: the forward pass, the backward pass, and the rest (all-reduce, clipping, AdamW + EMA).
        fb = rf["forward_backward_seconds"]
        result["rf_time_split"] = dict(forward=t_fwd / rf["seconds"], backward=(fb - t_fwd) / rf["seconds"],
                                       update=(rf["seconds"] - fb) / rf["seconds"])
    for name in FLAGS.graph_methods:
        result["train_graph"][name] = time_train_step(net_cfg, name, batch, jit_compile=False)
    for name in FLAGS.bf16_methods:
        result["precision"][name] = precision_rows(net_cfg, name, batch)
    result["sampling_img_per_s"] = sampling_rates(net, shape)
    result["input_pipeline_img_per_s"] = input_pipeline_rate(dcfg)
    return result


PRECISIONS = ("float32", "mixed_bfloat16")


def precision_rows(net_cfg, name, batch):
    """{policy: {"graph": img/s, "xla": img/s}} of method `name`'s train step, and "bf16_speedup": the best
    mixed_bfloat16 mode's img/s over the best float32 mode's."""
    import keras
    rows = {}
    try:
        for policy in PRECISIONS:
            keras.mixed_precision.set_global_policy(policy)
            rows[policy] = {mode: time_train_step(net_cfg, name, batch, jit_compile=mode == "xla")["img_per_s"]
                            for mode in ("graph", "xla")}
            print(f"{name} {policy}: graph {rows[policy]['graph']:.1f}, XLA {rows[policy]['xla']:.1f} img/s",
                  file=sys.stderr, flush=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rows["bf16_speedup"] = max(rows["mixed_bfloat16"].values()) / max(rows["float32"].values())
    return rows


def precision_table(rows):
    """Markdown lines of `precision_rows` results {method: rows}."""
    lines = ["| step (img/s) | float32 graph | float32 XLA | mixed_bfloat16 graph | mixed_bfloat16 XLA | "
             "bf16 best / fp32 best |", "|---|---|---|---|---|---|"]
    for name, p in rows.items():
        lines.append(f"| {name} | {p['float32']['graph']:.1f} | {p['float32']['xla']:.1f} | "
                     f"{p['mixed_bfloat16']['graph']:.1f} | {p['mixed_bfloat16']['xla']:.1f} | "
                     f"{p['bf16_speedup']:.2f}x |")
    return lines


def markdown(results, peaks):
    lines = [f"Matmul peak ({MATMUL_N}^3): fp32 {peaks['fp32']:.0f} GFLOP/s (TF {peaks['fp32_tf']:.0f}, numpy BLAS "
             f"{peaks['fp32_blas']:.0f}), bf16 (TF) {peaks['bf16']:.0f} GFLOP/s; CPU bf16 instructions: "
             f"{', '.join(cpu_bf16_support()) or 'none'}", ""]
    for r in results:
        if "forward_img_per_s" not in r:  # --precision_only
            lines += [f"**{r['flagfile']}** ({r['params']:,} parameters), batch {r['batch_size']}", "",
                      *precision_table(r["precision"]), ""]
            continue
        lines += [f"**{r['flagfile']}** ({r['params']:,} parameters), batch {r['batch_size']}, "
                  f"{'XLA' if r['jit_compile'] else 'graph mode'}; forward pass (XLA) "
                  f"{r['forward_img_per_s']:.0f} img/s; input pipeline alone {r['input_pipeline_img_per_s']:.0f} "
                  "img/s", "",
                  "| step | img/s | x RF time | ideal x | x RF FLOPs | GFLOP/s | of fp32 peak | img/s at peak | "
                  "graph-mode img/s |", "|---|---|---|---|---|---|---|---|---|"]
        for name, t in r["train"].items():
            graph = r["train_graph"].get(name, {}).get("img_per_s")
            lines.append(
                f"| {name} | {t['img_per_s']:.1f} | {t.get('ratio_to_rf', float('nan')):.2f} | "
                f"{t.get('ideal_ratio_to_rf', float('nan')):.2f} | {t.get('flop_ratio_to_rf', float('nan')):.2f} | "
                f"{t['gflops_per_s']:.0f} | "
                f"{t['fraction_of_fp32_peak']:.0%} | {t['img_per_s_at_fp32_peak']:.0f} | "
                f"{'-' if graph is None else f'{graph:.1f}'} |")
        if r["precision"]:
            lines += ["", *precision_table(r["precision"])]
        if "rf_time_split" in r:
            split = r["rf_time_split"]
            lines += ["", f"RF step time: forward {split['forward']:.0%}, backward {split['backward']:.0%}, "
                      f"update (all-reduce, clipping, AdamW + EMA) {split['update']:.0%}"]
        s = r["sampling_img_per_s"]
        lines += ["", f"Forward pass: {r['forward_flops'] / r['batch_size'] / 1e6:.0f} MFLOP per image, at most "
                  f"{r['forward_img_per_s_at_fp32_peak']:.0f} img/s at the fp32 peak",
                  "", "| sampling (Euler, XLA) | batch 1 | batch " + str(r["batch_size"]) + " |", "|---|---|---|"]
        for n in (1, 8):
            big = s[f"nfe{n}_batch{r['batch_size']}"]
            lines.append(f"| NFE {n} img/s | {s[f'nfe{n}_batch1']:.1f} | {big:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a --flag")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    for name in FLAGS.methods + FLAGS.graph_methods + FLAGS.bf16_methods:
        parse_method(name)
    from cud_tf import precision
    bf16_hardware = precision.bf16_hardware()
    print(f"bf16 hardware: {bf16_hardware}", file=sys.stderr, flush=True)
    peaks = dict(fp32_tf=matmul_peak(tf.float32), fp32_blas=blas_peak(), bf16=matmul_peak(tf.bfloat16))
    peaks["fp32"] = max(peaks["fp32_tf"], peaks["fp32_blas"])
    bench_flags = {k: FLAGS[k].value for k in ("flagfiles", "batch_size", "steps", "warmup", "methods",
                                               "graph_methods", "bf16_methods", "out", "profile_dir", "jit_compile",
                                               "precision_only")}
    results = []
    for flagfile in bench_flags["flagfiles"]:
        results.append(measure_network(flagfile, peaks, bench_flags))
        report = dict(cpu_count=os.cpu_count(), tensorflow=tf.__version__,
                      onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"), cpu_bf16=cpu_bf16_support(),
                      bf16_hardware=bf16_hardware, matmul_gflops=peaks, networks=results)
        text = json.dumps(report, indent=1)
        if bench_flags["out"]:  # after every network, so that a long run keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(bench_flags["out"])), exist_ok=True)
            with open(bench_flags["out"], "w") as f:
                f.write(text)
    print(text)
    print(markdown(results, peaks))


if __name__ == "__main__":
    cud_trainer.define_flags()
    define_flags()
    app.run(main)

"""Sampling speed through a reloaded SavedModel export versus the same sampler in-process.

`python -m benchmarks.export_speed [--run_dir=runs/x] [--steps=4]` exports the run (or, without --run_dir, a
quickstart-sized network of configs/mnist_quick.cfg with random weights: speed does not depend on the weights)
to a temporary folder, reloads it with `tf.saved_model.load`, and times one-step (`serving_default`) and
N-step (`generate`) sampling at each batch size beside the same computation as an in-process `tf.function`.
Prints JSON and a markdown table: images/s per batch size, the median latency of one call at batch 1, and at the
largest batch the GFLOP/s this reaches (forward FLOPs counted from the graph, times NFE) as a fraction of the
float32 matmul peak measured in the same process (the best of TF's and numpy's 2048^3 matmul, as
benchmarks/speed.py).
"""
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (matmul_peak, blas_peak, graph_flops)

FLAGS = flags.FLAGS


def define_flags():
    """The benchmark's flags."""
    flags.DEFINE_string("run_dir", None, "Run to export (default: a quickstart-sized network, random weights).")
    flags.DEFINE_integer("steps", 4, "N of the N-step rows (generate signature).", lower_bound=2)
    flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
    flags.DEFINE_string("sampler", "euler", "Fixed-step sampler of the export.")
    flags.DEFINE_float("min_seconds", 6.0, "Timed seconds per batch size and step count, both sides.")
    flags.DEFINE_integer("min_calls", 5, "Timed calls per measurement, at least.", lower_bound=1)

QUICKSTART = dict(image_shape=(28, 28, 1), base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                  attn_resolutions=(), mid_attention=False, dropout=0.0, cskip=0.25)


def network(run_dir_path):
    """The run's network, or without a run a quickstart-sized one with random weights (speed does not depend on
    them)."""
    from cud_tf import run_dir
    from cud_tf.networks.unet import UNetConfig, VelocityUNet
    if run_dir_path:
        return run_dir.load_run(run_dir_path).net
    return VelocityUNet(UNetConfig(**QUICKSTART), name="velocity").build_variables()


def timed(fns):
    """Per-call wall times (s) of each fn() after one warm-up call each. Calls alternate between the fns, so a
    change in machine load hits them alike; at least min_calls each and min_seconds in all."""
    for fn in fns:
        fn()
    times, start = [[] for _ in fns], time.perf_counter()
    while len(times[0]) < FLAGS.min_calls or time.perf_counter() - start < FLAGS.min_seconds:
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return times


def main(argv):
    del argv
    import tensorflow as tf

    from cud_tf import export, sampling, solvers

    net = network(FLAGS.run_dir)
    cfg = export.ExportConfig(sampler=FLAGS.sampler, max_images=max(int(b) for b in FLAGS.batches),
                              max_steps=FLAGS.steps)
    shape = tuple(net.config.image_shape)
    big = max(int(b) for b in FLAGS.batches)
    peak = max(speed.matmul_peak(tf.float32), speed.blas_peak())  # GFLOP/s
    one_step_ip = tf.function(lambda z: sampling.generate(net, z, 1, cfg.sampler, cfg.head))
    flops_per_image = speed.graph_flops(one_step_ip.get_concrete_function(tf.zeros([big, *shape]))) / big
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export(net, tmp, "bench", cfg)
        model = tf.saved_model.load(path)
        one_step_sm, generate_sm = model.signatures["serving_default"], model.signatures["generate"]
        generate_ip = tf.function(lambda seed, n, steps: sampling.generate(
            net, export.noise(seed, n, shape), steps, cfg.sampler, cfg.head))

        rows = []
        for steps in (1, FLAGS.steps):
            pair = [{"sampler": f"{cfg.sampler} x{steps}", "nfe": solvers.nfe(cfg.sampler, steps), "where": where}
                    for where in ("SavedModel", "in-process")]
            for b in (int(b) for b in FLAGS.batches):
                seed, n, s = tf.constant(0, tf.int64), tf.constant(b), tf.constant(steps)
                z = tf.random.stateless_normal([b, *shape], seed=[0, 0])
                if steps == 1:
                    fns = [lambda: one_step_sm(noise=z)["images"].numpy(), lambda: one_step_ip(z).numpy()]
                else:
                    fns = [lambda: generate_sm(seed=seed, num_images=n, num_steps=s)["images"].numpy(),
                           lambda: generate_ip(seed, n, s).numpy()]
                for row, times in zip(pair, timed(fns)):
                    row[f"images_per_s_b{b}"] = round(b * len(times) / sum(times), 1)
                    if b == big:
                        gflops = row[f"images_per_s_b{b}"] * row["nfe"] * flops_per_image / 1e9
                        row[f"gflops_per_s_b{b}"] = round(gflops, 1)
                        row[f"fraction_of_fp32_peak_b{b}"] = round(gflops / peak, 3)
                    if b == 1:
                        row["latency_ms_b1"] = round(1e3 * statistics.median(times), 2)
            rows += pair

    params = sum(int(tf.size(v)) for v in net.trainable_variables)
    result = {"network": {"image_shape": list(shape), "params": params,
                          "run_dir": os.path.abspath(FLAGS.run_dir) if FLAGS.run_dir else None},
              "tensorflow": tf.__version__, "cpu_threads": os.cpu_count(), "flops_per_image": flops_per_image,
              "fp32_peak_gflops_per_s": round(peak, 1), "rows": rows}
    print(json.dumps(result, indent=1))
    batches = [int(b) for b in FLAGS.batches]
    print("\n| sampler | NFE | where | " + " | ".join(f"images/s, batch {b}" for b in batches)
          + f" | latency, batch 1 | GFLOP/s, batch {big} | of the fp32 peak ({peak:.0f} GFLOP/s) |")
    print("|---|---|---|" + "---|" * len(batches) + "---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['nfe']} | {r['where']} | "
              + " | ".join(str(r[f"images_per_s_b{b}"]) for b in batches)
              + (f" | {r['latency_ms_b1']} ms" if "latency_ms_b1" in r else " | -")
              + f" | {r[f'gflops_per_s_b{big}']} | {100 * r[f'fraction_of_fp32_peak_b{big}']:.0f}% |")


if __name__ == "__main__":
    define_flags()
    app.run(main)

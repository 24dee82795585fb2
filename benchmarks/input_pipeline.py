"""The training input pipeline with and without op determinism, side by side.

    python -m benchmarks.input_pipeline --flagfile=configs/mnist_quick.cfg --global_batch_size=128
    python -m benchmarks.input_pipeline --flagfile=configs/mnist_quick.cfg --global_batch_size=128 --decode

Every trainer runs under `tf.config.experimental.enable_op_determinism()` (exact resume). tf.data then rewrites a
pipeline that holds a stateful op in any of its functions: every parallel map runs sequentially and prefetching
is off. This measures what the trainers' pipeline (`cud_tf.data.make_dataset`, the --flagfile's data set, batch
and flips) delivers in processes with op determinism on and off, which alternate (--processes of each):
- img/s of the pipeline alone (median of --rounds rounds of --batches batches);
- a consumer step: a fixed float32 matmul chain (--consumer_size) that reads each batch, its median ms fed by the
  pipeline against the same chain alone: what prefetching fails to hide.
`--decode` reads a split too big to cache as the trainers do: every pass decodes the images again.
Op determinism is process-wide and cannot be switched off, hence one process per setting. Prints JSON and a
markdown table, with the CPU's model and widest vector extension.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainers import common, cud as cud_trainer  # noqa: E402  (the data flags, which --flagfile sets)

FLAGS = flags.FLAGS
cud_trainer.define_flags()
flags.DEFINE_boolean("decode", False, "Never cache the split: every pass decodes its images again.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per process (medians over all processes of a setting).",
                     lower_bound=1)
flags.DEFINE_integer("batches", 30, "Batches per timed round.", lower_bound=1)
flags.DEFINE_integer("processes", 2, "Processes per setting, alternating.", lower_bound=1)
flags.DEFINE_integer("consumer_size", 600, "N of the consumer's N x N matmul chain.", lower_bound=1)
flags.DEFINE_enum("worker", "", ["", "on", "off"], "Internal: measure in this process, op determinism on/off.")
flags.DEFINE_string("out", "", "Write the JSON here too.")


def measure(determinism):
    """{alone_img_per_s, fed_step_ms, consumer_ms}: lists of per-round values in this process."""
    import tensorflow as tf
    if determinism:
        tf.config.experimental.enable_op_determinism()
    from cud_tf.data import pipeline
    if FLAGS.decode:
        pipeline._CACHE_BYTES = 0
    batch = FLAGS.global_batch_size
    it = iter(pipeline.make_dataset(common.data_config(), batch, FLAGS.seed))
    a = tf.random.stateless_normal([FLAGS.consumer_size] * 2, seed=[1, 2])
    consumer = tf.function(lambda a, x: tf.reduce_sum(tf.matmul(tf.matmul(a, a), a)) + tf.reduce_sum(x))

    def seconds_per_batch(fn):
        t = time.perf_counter()
        for _ in range(FLAGS.batches):
            fn().numpy()
        return (time.perf_counter() - t) / FLAGS.batches

    seconds_per_batch(lambda: consumer(a, next(it)["image"]))  # warm-up: tracing, the shuffle buffer, the cache
    seconds_per_batch(lambda: consumer(a, a))
    out = dict(alone_img_per_s=[], fed_step_ms=[], consumer_ms=[])
    for _ in range(FLAGS.rounds):
        out["alone_img_per_s"].append(batch / seconds_per_batch(lambda: next(it)["image"]))
        out["fed_step_ms"].append(1e3 * seconds_per_batch(lambda: consumer(a, next(it)["image"])))
        out["consumer_ms"].append(1e3 * seconds_per_batch(lambda: consumer(a, a)))
    return out


def main(argv):
    if FLAGS.worker:
        print("RESULT " + json.dumps(measure(FLAGS.worker == "on")), flush=True)
        return
    from cud_tf import execution
    flagfile = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
    with flagfile:  # every resolved flag, for the workers
        flagfile.write("\n".join(line for line in FLAGS.flags_into_string().splitlines()
                                 if not line.startswith(("--out=", "--worker=", "--flagfile="))))
    runs = {"on": [], "off": []}
    try:
        for i in range(FLAGS.processes):
            for setting in (("on", "off") if i % 2 == 0 else ("off", "on")):
                cmd = [sys.executable, "-m", "benchmarks.input_pipeline", f"--flagfile={flagfile.name}",
                       f"--worker={setting}"]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"the op determinism {setting} worker failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip().splitlines()[-1:] or 'no output'}")
                runs[setting].append(json.loads(line[len("RESULT "):]))
                print(f"process {setting}: done", file=sys.stderr, flush=True)
    finally:
        os.unlink(flagfile.name)
    result = dict(device=execution.device_name(), batch=FLAGS.global_batch_size, decode=FLAGS.decode,
                  dataset=FLAGS.dataset, random_flip=FLAGS.random_flip, consumer_size=FLAGS.consumer_size)
    for setting, procs in runs.items():
        result[f"determinism_{setting}"] = {k: round(statistics.median(v for p in procs for v in p[k]), 2)
                                            for k in procs[0]}
    on, off = result["determinism_on"], result["determinism_off"]
    result["alone_on_over_off"] = round(on["alone_img_per_s"] / off["alone_img_per_s"], 3)
    for r in (on, off):
        r["unhidden_ms"] = round(r["fed_step_ms"] - r["consumer_ms"], 2)
    print(json.dumps(result, indent=1))
    print(f"\n{result['device']}; {result['dataset']}, batch {result['batch']}, "
          f"{'decoded every pass' if FLAGS.decode else 'cached'}\n")
    print("| op determinism | pipeline alone img/s | consumer fed ms | consumer alone ms | not hidden ms |")
    print("|---|---|---|---|---|")
    for setting in ("on", "off"):
        r = result[f"determinism_{setting}"]
        print(f"| {setting} | {r['alone_img_per_s']:.0f} | {r['fed_step_ms']:.1f} | {r['consumer_ms']:.1f} | "
              f"{r['unhidden_ms']:.1f} |")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)

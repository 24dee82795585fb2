"""Where a one-step forward pass spends its time, by TF op type (graph mode, as a SavedModel runs it).

    python -m benchmarks.op_profile [--run_dir=runs/x] [--batch=64] [--calls=3]

Builds the run's network (or, without --run_dir, the quickstart-sized network of benchmarks/export_speed.py with
random weights), traces `sampling.generate(net, z, 1)` as a `tf.function`, times --timed_calls calls after
warm-up, then records --calls calls with the TF profiler and sums the kernels' durations per op type from the
trace (the XSpace protobuf the profiler writes; TensorBoard's Profile tab shows the same trace). The op types are
those that ran: `_MklNativeFusedConv2D` where oneDNN is on (`TF_ENABLE_ONEDNN_OPTS`, which `trainers` sets to 1
unless the environment says otherwise), `_FusedConv2D` with Eigen's kernels. Ops run concurrently on several
cores, so the op times can add up to more than the wall time. Prints JSON (with the device: the CPU's model and
vector extensions) and a markdown table.
"""
import collections
import glob
import json
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_speed  # noqa: E402  (network; imports trainers, which sets the oneDNN default)
import speed  # noqa: E402  (median_seconds)

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Run whose network to profile (default: a quickstart-sized network).")
flags.DEFINE_integer("batch", 64, "Images per call.", lower_bound=1)
flags.DEFINE_integer("calls", 3, "Profiled calls (their op times are averaged).", lower_bound=1)
flags.DEFINE_integer("timed_calls", 7, "Calls timed without the profiler (median reported).", lower_bound=1)
flags.DEFINE_integer("top", 20, "Op types listed in the table.", lower_bound=1)


def op_times(logdir):
    """Two Counters, {op type: total picoseconds} and {op type: kernels}, of the trace under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    totals, counts = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            if "CPU" not in plane.name:
                continue
            names = {k: v.name for k, v in plane.event_metadata.items()}
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):  # the executor's threads; not the Python thread
                    continue
                for event in line.events:
                    name = names.get(event.metadata_id, "")
                    if name.count(":") != 1 or "::" in name:  # kernels are "node name:op type", not "Class::method"
                        continue
                    op = name.split(":")[1]
                    totals[op] += event.duration_ps
                    counts[op] += 1
    return totals, counts


def main(argv):
    del argv
    import tensorflow as tf

    from cud_tf import execution, sampling

    net = export_speed.network(FLAGS.run_dir)
    forward = tf.function(lambda z: sampling.generate(net, z, 1))
    z = tf.random.stateless_normal([FLAGS.batch, *net.config.image_shape], seed=[0, 0])
    wall = speed.median_seconds(lambda: forward(z), FLAGS.timed_calls, 3)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(FLAGS.calls):
            execution.fetch(forward(z))
        tf.profiler.experimental.stop()
        totals, counts = op_times(logdir)
    if not totals:
        raise SystemExit("the profiler trace held no CPU kernels: nothing to report")
    all_ps = sum(totals.values())
    rows = [dict(op=op, ms_per_call=ps / FLAGS.calls / 1e9, share=ps / all_ps, count_per_call=counts[op] / FLAGS.calls)
            for op, ps in totals.most_common()]
    result = dict(network=dict(run_dir=os.path.abspath(FLAGS.run_dir) if FLAGS.run_dir else None,
                               image_shape=list(net.config.image_shape)),
                  batch=FLAGS.batch, tensorflow=tf.__version__, device=execution.device_name(),
                  onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "TF's default"),
                  wall_ms_per_call=wall * 1e3, images_per_s=FLAGS.batch / wall,
                  op_ms_per_call=all_ps / FLAGS.calls / 1e9, ops=rows)
    print(json.dumps(result, indent=1))
    print(f"\nOne-step forward pass, batch {FLAGS.batch}: {wall * 1e3:.1f} ms a call (median of "
          f"{FLAGS.timed_calls}), {FLAGS.batch / wall:.1f} img/s; kernels {result['op_ms_per_call']:.1f} ms a call "
          f"(TF_ENABLE_ONEDNN_OPTS={result['onednn']})\n")
    print("| op type | ms per call | share of kernel time | kernels per call |\n|---|---|---|---|")
    for r in rows[:FLAGS.top]:
        print(f"| {r['op']} | {r['ms_per_call']:.1f} | {100 * r['share']:.1f}% | {r['count_per_call']:.0f} |")


if __name__ == "__main__":
    app.run(main)

"""Quality on MNIST against NFE: rectified flow vs CUD K=1,2,3 (same network, iterations, batch and seed), the
one-step stage on the best CUD model (and its ablation with f_EMA frozen), and the distillations of one teacher
run (default CUD K=1): TRACT and binary time distillation with the same training images, DisBack (the paper's
schedule scaled to 2 cores, configs/disback_mnist_paper.cfg) and its path-off ablation with the same stage-2
iterations (plus DisBack's distance at NFE 1 against iterations for both, disback_curve.png, and the fake-target
gap over each target node). Every model is evaluated by `trainers.evaluate` with the same noise and sample count.
Prints one table (and writes quality_mnist.json / .md in --out_dir):

    python benchmarks/quality_mnist.py --out_dir=runs/quality_mnist

Every stage is a subprocess of the real trainers; a rerun resumes finished runs instead of retraining them and
reuses evaluations of the same checkpoint. Training seconds come from the runs' TensorBoard event times.
"""
import glob
import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's cud_tf (latest_checkpoint), as the subprocesses get it
FLAGS = flags.FLAGS

flags.DEFINE_string("out_dir", "runs/quality_mnist", "Where the runs, evaluations and the table go.")
flags.DEFINE_string("base_flagfile", "configs/mnist_quick.cfg", "Flagfile of the network and optimisation, for all.")
flags.DEFINE_string("onestep_flagfile", "configs/mnist_onestep.cfg", "Flagfile of the one-step stage.")
flags.DEFINE_integer("train_steps", 600, "Training iterations of every method.", lower_bound=1)
flags.DEFINE_integer("onestep_steps", 600, "Iterations of the one-step stage (all its stages together).",
                     lower_bound=1)
flags.DEFINE_integer("onestep_num_pairs", 10000, "Stored trajectories of the one-step stage.", lower_bound=1)
flags.DEFINE_integer("global_batch_size", 64, "Batch of every method.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of every method.")
flags.DEFINE_list("nfe", ["1", "2", "4", "8", "16"], "NFEs of the table.")
flags.DEFINE_integer("num_samples", 10000, "Generated images per model and NFE.", lower_bound=2)
flags.DEFINE_list("orders", ["1", "2", "3"], "CUD orders K to train.")
flags.DEFINE_string("distill_teacher", "cud1", "Method whose run is the teacher of TRACT, BTD and DisBack "
                    "('' skips the distillations).")
flags.DEFINE_integer("distill_steps", 600, "Training steps of TRACT and BTD.", lower_bound=1)
flags.DEFINE_string("disback_flagfile", "configs/disback_mnist_paper.cfg", "DisBack's schedule (nodes, iterations "
                    "per node, update ratio, learning rates) for both DisBack rows; the path-off row changes only "
                    "--disback_path.")
flags.DEFINE_integer("disback_steps", 2000, "Stage-2 iterations of both DisBack runs.", lower_bound=1)
flags.DEFINE_integer("curve_every", 250, "DisBack iterations between the checkpoints of the distance curve.",
                     lower_bound=1)
flags.DEFINE_integer("curve_samples", 1000, "Samples per point of the DisBack curve.", lower_bound=2)
flags.DEFINE_multi_string("train_flag", [], "An extra flag for every trainer (repeatable), e.g. "
                          "--train_flag=--data_dir=DIR.")
flags.DEFINE_multi_string("eval_flag", [], "An extra flag for every evaluation (repeatable), e.g. "
                          "--eval_flag=--classifier_dir=DIR.")


def call(module, *args):
    """Runs `python -m module args`; exits with the tail of its stderr when it fails."""
    cmd = [sys.executable, "-m", module, *args]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        sys.exit(f"error: {module} failed (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - t0


def latest_checkpoint(run_dir):
    """The newest checkpoint prefix of a run (`cud_tf.run_dir.latest_checkpoint`), or None when it has none."""
    from cud_tf import run_dir as run_dirs
    try:
        return run_dirs.latest_checkpoint(run_dir)
    except run_dirs.RunError:
        return None


def train(module, run_dir, steps, *args):
    """`python -m module --run_dir=run_dir args`, unless the run already holds its final checkpoint ckpt-<steps>
    (starting TF and the trainer only to find it finished costs ~30 s per run here)."""
    if os.path.basename(latest_checkpoint(run_dir) or "") != f"ckpt-{steps}":
        call(module, *args, f"--run_dir={run_dir}")  # last: a flagfile among args sets its own --run_dir


def evaluate(run_dir, head, nfes=None, checkpoint=None, out_dir=None, num_samples=None):
    """trainers.evaluate's JSON for a run (its latest checkpoint by default); reused when the same checkpoint
    was already evaluated with the same NFEs and sample count."""
    nfes = [str(k) for k in (nfes or FLAGS.nfe)]
    num_samples = num_samples or FLAGS.num_samples
    checkpoint = checkpoint or latest_checkpoint(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "eval")
    path = os.path.join(out_dir, f"eval_euler_head{head}.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if (os.path.basename(old["checkpoint"]) == os.path.basename(checkpoint or "") and
                old["num_samples"] == num_samples and [str(r["nfe"]) for r in old["rows"]] == nfes):
            return old
    call("trainers.evaluate", f"--run_dir={run_dir}", f"--nfe={','.join(nfes)}", f"--num_samples={num_samples}",
         f"--head={head}", f"--out_dir={out_dir}", *([f"--checkpoint={checkpoint}"] if checkpoint else []),
         *FLAGS.eval_flag)
    with open(path) as f:
        return json.load(f)


def tb_scalars(tb_dir, tag):
    """{step: value} of one scalar tag in the TensorBoard event files of `tb_dir`."""
    import tensorflow as tf
    out = {}
    for events in sorted(tf.io.gfile.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        for e in tf.compat.v1.train.summary_iterator(events):
            for v in e.summary.value:
                if v.tag == tag:
                    out[e.step] = float(tf.make_ndarray(v.tensor))
    return out


def train_seconds(run_dir):
    """Training time of a run, summed over its stages, from its TensorBoard `images_per_sec` scalars (each covers
    the steps since the previous one): resumes and pauses between them do not count, nor does start-up."""
    batch = FLAGS.global_batch_size
    with open(os.path.join(run_dir, "flags.txt")) as f:
        for line in f:
            if line.startswith("--global_batch_size="):
                batch = int(line.split("=", 1)[1])
    total = 0.0
    for tb in (os.path.join(run_dir, "tb"), os.path.join(run_dir, "degradation", "tb")):
        speed = tb_scalars(tb, "images_per_sec")
        previous = 0
        for step in sorted(speed):
            total += (step - previous) * batch / max(speed[step], 1e-9)
            previous = step
    return total


def fake_target_gaps(run_dir):
    """The fake-target gap (TensorBoard `fake_target_gap`: mean squared difference of the fake's and the target's
    velocities) over each target of a DisBack run, in the order of its target_switches.jsonl:
    [{"node", "from", "to", "first", "mean", "last"}] (iterations [from, to), logged values inside them)."""
    with open(os.path.join(run_dir, "target_switches.jsonl")) as f:
        switches = [json.loads(line) for line in f if line.strip()]
    gap = tb_scalars(os.path.join(run_dir, "tb"), "fake_target_gap")
    end = max(gap, default=0)
    out = []
    for k, switch in enumerate(switches):
        first = switch["iteration"]
        last = switches[k + 1]["iteration"] if k + 1 < len(switches) else end
        values = [gap[s] for s in sorted(gap) if first < s <= last]  # the value logged at step s is iteration s-1's
        if values:
            out.append({"node": switch["node"], "from": first, "to": last, "first": values[0],
                        "mean": sum(values) / len(values), "last": values[-1]})
    return out


def disback_curve(runs, out):
    """Distance at NFE 1 against stage-2 iterations for each DisBack run {name: run_dir}; writes
    disback_curve.json and .png in `out` and returns {name: [(iteration, distance)]}."""
    curves = {}
    for name, run_dir in runs.items():
        points = []
        for index in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "ckpt-*.index")),
                            key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
            prefix = index[:-len(".index")]
            step = int(prefix.rsplit("-", 1)[1])
            result = evaluate(run_dir, 1, nfes=[1], checkpoint=prefix, num_samples=FLAGS.curve_samples,
                              out_dir=os.path.join(run_dir, "eval_curve", f"ckpt-{step}"))
            points.append((step, result["rows"][0]["distance"]))
        curves[name] = points
    with open(os.path.join(out, "disback_curve.json"), "w") as f:
        json.dump(dict(num_samples=FLAGS.curve_samples, curves=curves), f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
    ax.set_xlabel("stage-2 iteration")
    ax.set_ylabel("FD (MNIST classifier), NFE 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "disback_curve.png"), dpi=100)
    plt.close(fig)
    return curves


def run_args():
    """What every trainer run of the benchmark shares after its flagfile: batch, seed, no progress bar, --train_flag."""
    return [f"--global_batch_size={FLAGS.global_batch_size}", f"--seed={FLAGS.seed}", "--noprogress",
            *FLAGS.train_flag]


def time_distillations(out, teacher, row):
    """TRACT and BTD of the `teacher` run with the same training images: their rows."""
    d, rows = FLAGS.distill_steps, []
    for name, flagfile, phases in (("tract", "tract_mnist.cfg", 2), ("btd", "btd_mnist.cfg", 10)):
        if d % phases:
            sys.exit(f"error: --distill_steps={d} does not split into {phases} phases")
        train("trainers.tract", os.path.join(out, name), d, f"--flagfile=configs/{flagfile}",
              f"--tract_teacher_run_dir={teacher}", f"--tract_steps_per_phase={d // phases}", f"--train_steps={d}",
              *run_args())
        rows.append(row(f"{name.upper()} of {FLAGS.distill_teacher}", os.path.join(out, name), 1))
    return rows


def disbacks(out, teacher, row):
    """DisBack of the `teacher` run, path on and off with the same schedule: (rows, distance curves, fake-target
    gaps)."""
    rows, gaps, runs = [], {}, {}
    for name, path in (("disback", "on"), ("disback_path_off", "off")):
        run_dir = os.path.join(out, name)
        train("trainers.disback", run_dir, FLAGS.disback_steps, f"--flagfile={FLAGS.disback_flagfile}",
              f"--disback_teacher_run_dir={teacher}", f"--disback_path={path}",
              f"--train_steps={FLAGS.disback_steps}", f"--checkpoint_every={FLAGS.curve_every}",
              f"--keep_checkpoints={FLAGS.disback_steps // FLAGS.curve_every + 1}", *run_args())
        label = "DisBack" if path == "on" else "DisBack, path off (plain distribution matching)"
        rows.append(row(f"{label} of {FLAGS.distill_teacher}", run_dir, 1, [1]))
        runs[label] = run_dir
        gaps[label] = fake_target_gaps(run_dir)
    return rows, disback_curve(runs, out), gaps


def table(rows, nfes, metric):
    lines = [f"| method | {' | '.join(f'NFE {k}' for k in nfes)} | train s |", "|---" * (len(nfes) + 2) + "|"]
    for r in rows:
        cells = [f"{r['distance'][str(k)]:.2f}" if str(k) in r["distance"] else "-" for k in nfes]
        lines.append(f"| {r['method']} | {' | '.join(cells)} | {r['train_seconds']:.0f} |")
    return (f"{metric}, Euler sampler, {FLAGS.num_samples} samples; {FLAGS.train_steps} iterations (one-step stage "
            f"{FLAGS.onestep_steps}; TRACT/BTD {FLAGS.distill_steps}; DisBack {FLAGS.disback_steps} stage-2 "
            f"iterations of {os.path.basename(FLAGS.disback_flagfile)})\n\n" + "\n".join(lines) + "\n")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a --flag")
    out = os.path.abspath(FLAGS.out_dir)
    nfes = [int(k) for k in FLAGS.nfe]
    common = [f"--flagfile={FLAGS.base_flagfile}", f"--train_steps={FLAGS.train_steps}",
              f"--global_batch_size={FLAGS.global_batch_size}", f"--seed={FLAGS.seed}", "--noprogress",
              *FLAGS.train_flag]
    methods = [("rf", ["--method=rf"], 1)] + [
        (f"cud{k}", ["--method=cud", f"--cud_order={k}"], int(k)) for k in FLAGS.orders]
    if FLAGS.distill_teacher and FLAGS.distill_teacher not in [m[0] for m in methods]:
        sys.exit(f"error: --distill_teacher={FLAGS.distill_teacher} is not a trained method of this benchmark")
    metric = None

    def row(name, run_dir, head, nfes_=None):
        nonlocal metric
        result = evaluate(run_dir, head, nfes_)
        metric = result["metric"]
        return dict(method=name, run_dir=run_dir, head=head, train_seconds=train_seconds(run_dir),
                    distance={str(r["nfe"]): r["distance"] for r in result["rows"]})

    # Work order: the distillation teacher first and its time distillations right after it, then the other
    # methods and the one-step stage, DisBack (the longest) last; the table keeps its fixed order.
    method_rows, time_rows = [], []
    for name, args, order in sorted(methods, key=lambda m: m[0] != FLAGS.distill_teacher):
        run_dir = os.path.join(out, name)
        train("trainers.cud", run_dir, FLAGS.train_steps, *common, *args)
        method_rows += [row(name if head == 1 else f"{name} (head g_{head})", run_dir, head)
                        for head in sorted({1, order})]
        if name == FLAGS.distill_teacher:
            time_rows = time_distillations(out, run_dir, row)
    method_rows.sort(key=lambda r: [m[0] for m in methods].index(os.path.basename(r["run_dir"])))

    cud_rows = [r for r in method_rows if r["method"].startswith("cud")]
    if not cud_rows:
        sys.exit("error: --orders is empty; the one-step stage needs a CUD model")
    best = min(cud_rows, key=lambda r: r["distance"][str(min(nfes))])
    # Named after its source so that a rerun whose best CUD model changed trains a new one-step stage. The
    # ablation freezes f_EMA at the CUD model's EMA weights (what this project did before it followed the
    # reference's moving f_EMA), all else equal.
    onestep_rows = []
    for suffix, extra, label in (("", [], ""), ("_frozen_f_ema", ["--onestep_f_ema_decay=1.0"], ", f_EMA frozen")):
        onestep_dir = os.path.join(out, f"onestep_{os.path.basename(best['run_dir'])}_g{best['head']}{suffix}")
        train("trainers.onestep", onestep_dir, FLAGS.onestep_steps, f"--flagfile={FLAGS.onestep_flagfile}",
              f"--init_run_dir={best['run_dir']}", f"--train_steps={FLAGS.onestep_steps}",
              f"--onestep_num_pairs={FLAGS.onestep_num_pairs}", f"--onestep_head={best['head']}", *extra,
              *run_args())
        onestep_rows.append(row(f"{best['method']} + one-step stage{label}", onestep_dir, best["head"]))
    rows = method_rows + onestep_rows + time_rows
    curves, gaps = {}, {}
    if FLAGS.distill_teacher:
        disback_rows, curves, gaps = disbacks(out, os.path.join(out, FLAGS.distill_teacher), row)
        rows += disback_rows

    md = table(rows, nfes, metric)
    if gaps:
        md += ("\nDisBack's fake-target gap (mean squared velocity difference) over each target, logged values "
               "first / mean / last\n\n| run | target | iterations | first | mean | last |\n"
               "|---|---|---|---|---|---|\n")
        md += "".join(f"| {label} | s'_{g['node']} | {g['from']}-{g['to']} | {g['first']:.4g} | {g['mean']:.4g} | "
                      f"{g['last']:.4g} |\n" for label, rows_ in gaps.items() for g in rows_)
    with open(os.path.join(out, "quality_mnist.json"), "w") as f:
        json.dump(dict(metric=metric, num_samples=FLAGS.num_samples, train_steps=FLAGS.train_steps,
                       onestep_steps=FLAGS.onestep_steps, global_batch_size=FLAGS.global_batch_size,
                       seed=FLAGS.seed, distill_steps=FLAGS.distill_steps, disback_steps=FLAGS.disback_steps,
                       disback_flagfile=FLAGS.disback_flagfile, rows=rows, disback_curves=curves,
                       disback_gaps=gaps), f, indent=1)
    with open(os.path.join(out, "quality_mnist.md"), "w") as f:
        f.write(md)
    print(json.dumps(rows))
    print(md)


if __name__ == "__main__":
    app.run(main)

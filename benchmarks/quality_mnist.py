"""Quality on MNIST against NFE: rectified flow vs CUD K=1,2,3 (same network, iterations, batch and seed), then the
one-step stage on the best CUD model; every model evaluated by `trainers.evaluate` with the same noise and sample
count. Prints one table (and writes quality_mnist.json / .md in --out_dir):

    python benchmarks/quality_mnist.py --out_dir=runs/quality_mnist

Every stage is a subprocess of the real trainers; a rerun resumes finished runs instead of retraining them.
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def evaluate(run_dir, head):
    call("trainers.evaluate", f"--run_dir={run_dir}", f"--nfe={','.join(FLAGS.nfe)}",
         f"--num_samples={FLAGS.num_samples}", f"--head={head}", *FLAGS.eval_flag)
    with open(os.path.join(run_dir, "eval", f"eval_euler_head{head}.json")) as f:
        return json.load(f)


def table(rows, nfes, metric):
    lines = [f"| method | {' | '.join(f'NFE {k}' for k in nfes)} | train s |", "|---" * (len(nfes) + 2) + "|"]
    for r in rows:
        cells = [f"{r['distance'][str(k)]:.2f}" if str(k) in r["distance"] else "-" for k in nfes]
        lines.append(f"| {r['method']} | {' | '.join(cells)} | {r['train_seconds']:.0f} |")
    return f"{metric}, Euler sampler, {FLAGS.num_samples} samples, {FLAGS.train_steps} iterations\n\n" + "\n".join(
        lines) + "\n"


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
    rows, metric = [], None

    def add(name, run_dir, head, seconds):
        nonlocal metric
        result = evaluate(run_dir, head)
        metric = result["metric"]
        rows.append(dict(method=name, run_dir=run_dir, head=head, train_seconds=seconds,
                         distance={str(r["nfe"]): r["distance"] for r in result["rows"]}))

    for name, args, order in methods:
        run_dir = os.path.join(out, name)
        seconds = call("trainers.cud", *common, *args, f"--run_dir={run_dir}")
        for head in sorted({1, order}):
            add(name if head == 1 else f"{name} (head g_{head})", run_dir, head, seconds)
    cud_rows = [r for r in rows if r["method"].startswith("cud")]
    if not cud_rows:
        sys.exit("error: --orders is empty; the one-step stage needs a CUD model")
    best = min(cud_rows, key=lambda r: r["distance"][str(min(nfes))])
    onestep_dir = os.path.join(out, "onestep")
    seconds = call("trainers.onestep", f"--flagfile={FLAGS.onestep_flagfile}", f"--init_run_dir={best['run_dir']}",
                   f"--run_dir={onestep_dir}", f"--train_steps={FLAGS.onestep_steps}",
                   f"--onestep_num_pairs={FLAGS.onestep_num_pairs}", f"--onestep_head={best['head']}",
                   f"--global_batch_size={FLAGS.global_batch_size}", f"--seed={FLAGS.seed}", "--noprogress",
                   *FLAGS.train_flag)
    add(f"{best['method']} + one-step stage", onestep_dir, best["head"], seconds)

    md = table(rows, nfes, metric)
    with open(os.path.join(out, "quality_mnist.json"), "w") as f:
        json.dump(dict(metric=metric, num_samples=FLAGS.num_samples, train_steps=FLAGS.train_steps,
                       onestep_steps=FLAGS.onestep_steps, global_batch_size=FLAGS.global_batch_size,
                       seed=FLAGS.seed, rows=rows), f, indent=1)
    with open(os.path.join(out, "quality_mnist.md"), "w") as f:
        f.write(md)
    print(json.dumps(rows))
    print(md)


if __name__ == "__main__":
    app.run(main)

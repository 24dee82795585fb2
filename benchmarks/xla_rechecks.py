"""Does `--jit_compile` unset follow the faster mode when the machine's load changes? Training steps under three
policies, through phases of a load schedule: graph mode throughout, XLA throughout, and the default (the probe at
the start, then `cud_tf.execution.Rechecks` re-checking on the run's own steps).

    python benchmarks/xla_rechecks.py --flagfile=configs/mnist_quick.cfg --phases=quiet,busy,quiet,busy \
        --phase_steps=60 --out=runs/xla_rechecks.json

A busy phase runs --busy_procs processes that spin on a core each, as another tenant of a shared machine would.
In every phase each policy runs --phase_steps real train steps (the network and --global_batch_size of
--flagfile; one model, so every policy trains the same weights) in blocks of --block_steps, the policies taking
turns block by block in an order that rotates, so that a change of the machine's speed within a phase weighs on
each alike. --kind picks the step: rf, cud1 (CUD K=1), tract (one TRACT phase) or disback (DisBack's generator
step, then 4 fake-only steps; its probe and re-checks time whole cycles of the two, as the trainer does). The
default's probe runs once, on an empty cache, in the first phase; its re-checks are due every --check_minutes
after --min_steps steps of its own (the trainers: 10 minutes, 100 steps), scaled down so that a phase of a
benchmark holds one. Reported per phase: each policy's median and total seconds a step, the default's steps in
XLA and its checks; overall: each policy's total and the default's total over the better fixed mode's and over
the phase-by-phase best ("oracle"). Prints JSON and a markdown table.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainers import common, cud as cud_trainer  # noqa: E402  (the network flags, which --flagfile sets)

FLAGS = flags.FLAGS
cud_trainer.define_flags()
flags.DEFINE_enum("kind", "rf", ["rf", "cud1", "tract", "disback"],
                  "Which train step: rf, cud1 (CUD K=1), tract (one phase of TRACT), disback (DisBack's iterations: "
                  "one generator step, then 4 fake-only steps).")
flags.DEFINE_list("phases", ["quiet", "busy", "quiet", "busy"], "The load schedule: quiet or busy per phase.")
flags.register_validator("phases", lambda v: bool(v) and set(v) <= {"quiet", "busy"},
                         "--phases takes a list of quiet and busy")
flags.DEFINE_integer("phase_steps", 60, "Train steps per policy and phase.", lower_bound=10)
flags.DEFINE_integer("block_steps", 10, "Steps a policy runs before the next policy's turn.", lower_bound=1)
flags.DEFINE_integer("busy_procs", 1, "Spinning processes during a busy phase.", lower_bound=1)
flags.DEFINE_float("check_minutes", 0.05, "The default's re-check interval (the trainers: 10).", lower_bound=0.0)
flags.DEFINE_integer("min_steps", 10, "The default's steps between re-checks (the trainers: 100).", lower_bound=1)
flags.DEFINE_string("out", "", "Write the JSON here too.")

POLICIES = ("graph", "xla", "default")


class Load:
    """--busy_procs processes spinning on a core each while the context is open (a busy phase)."""

    def __init__(self, busy):
        self.busy, self.procs = busy, []

    def __enter__(self):
        if self.busy:
            self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(FLAGS.busy_procs)]
            time.sleep(1.0)  # let the spinners take their cores
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def build():
    """(model, batch) of --kind on the --flagfile network (dropout on, as in training)."""
    import tensorflow as tf
    from cud_tf.models.base import DiffusionModel, OptimConfig
    from cud_tf.models.disback import DisbackModel
    from cud_tf.models.tract import TractModel
    from cud_tf.networks.unet import VelocityUNet
    from cud_tf.objectives import OBJECTIVES, ObjectiveConfig, disback, tract

    cfg = common.network_config((28, 28, 1), num_classes=0)
    b = FLAGS.global_batch_size
    batch = {"image": tf.random.stateless_uniform([b, 28, 28, 1], [0, 4], -1.0, 1.0), "label": tf.zeros([b], tf.int32)}
    names = ("velocity",) if FLAGS.kind in ("rf", "cud1") else ("velocity", "second", "third")
    nets = [VelocityUNet(cfg, name=n).build_variables() for n in names]
    optim = OptimConfig(learning_rate=1e-5)
    if FLAGS.kind == "tract":  # one phase throughout: a phase change would swap the teacher in mid-benchmark
        return TractModel(*nets, tract.TractConfig(schedule=(64, 16), steps_per_phase=10 ** 6), optim, b,
                          jit_compile=None), batch
    if FLAGS.kind == "disback":  # generator, fake (score of the generator's samples), target: as the trainer
        return DisbackModel(*nets, disback.DisbackConfig(fake_updates_per_generator=5), optim, b,
                            jit_compile=None), batch
    objective, ocfg = (OBJECTIVES["rf"], ObjectiveConfig()) if FLAGS.kind == "rf" else (
        OBJECTIVES["cud"], ObjectiveConfig(order=1))
    return DiffusionModel(nets[0], objective, ocfg, optim, b, jit_compile=None), batch


def run():
    import numpy as np
    import tensorflow as tf
    from cud_tf import execution

    execution.RECHECK_MIN_STEPS = FLAGS.min_steps
    model, batch = build()
    strategy = tf.distribute.get_strategy()

    @tf.function
    def train_step(xla):
        del xla  # a Python bool, equal to model.xla: one trace per mode
        return strategy.run(model.train_step, args=(batch,))["loss"]

    def step(xla):
        model.xla = xla
        t0 = time.perf_counter()
        float(train_step(xla))
        return time.perf_counter() - t0

    period = sum(w for _, w in model.step_kinds())  # DisBack: a generator step, then the fake-only steps
    for xla in (False, True):  # tracing and XLA compilation of every step kind, outside every phase
        for _ in range(period):
            step(xla)
    checks, choice = None, None
    phases = []
    for p, load in enumerate(FLAGS.phases):
        row = {"load": load}
        order = POLICIES[p % 3:] + POLICIES[:p % 3]
        with Load(load == "busy"):
            if checks is None:
                os.environ["CUD_TF_CACHE"] = tempfile.mkdtemp()
                choice = execution.choose_xla(model, strategy, batch, log=lambda _: None)
                row["probe"] = {k: choice[k] for k in ("xla", "graph_s", "xla_s", "rounds")}
                checks = execution.Rechecks(choice, FLAGS.check_minutes, period=period)  # as the trainers
            times = {policy: [] for policy in POLICIES}
            modes, done = [], []
            for b in range(FLAGS.phase_steps // FLAGS.block_steps):
                for policy in order[b % 3:] + order[:b % 3]:
                    for _ in range(FLAGS.block_steps):
                        xla = checks.mode() if policy == "default" else policy == "xla"
                        times[policy].append(step(xla))
                        if policy == "default":
                            modes.append(xla)
                            check = checks.record(xla, times[policy][-1])
                            if check is not None:
                                done.append(check)
            for policy in POLICIES:
                row[policy] = dict(median_s=float(np.median(times[policy])), total_s=float(np.sum(times[policy])))
            row["default"].update(xla_steps=int(np.sum(modes)), checks=done)
        phases.append(row)
        print(json.dumps(row), flush=True)
    totals = {policy: sum(r[policy]["total_s"] for r in phases) for policy in POLICIES}
    oracle = sum(min(r["graph"]["total_s"], r["xla"]["total_s"]) for r in phases)
    return dict(config=dict(argv=sys.argv[1:], kind=FLAGS.kind, batch=FLAGS.global_batch_size,
                            phase_steps=FLAGS.phase_steps, block_steps=FLAGS.block_steps, busy_procs=FLAGS.busy_procs,
                            check_minutes=FLAGS.check_minutes, min_steps=FLAGS.min_steps,
                            device=execution.device_name()),
                phases=phases, totals=totals,
                default_over_best_fixed=totals["default"] / min(totals["graph"], totals["xla"]),
                default_over_oracle=totals["default"] / oracle)


def table(result):
    lines = ["| phase | load | graph s/step | XLA s/step | XLA / graph | default s/step | default steps in XLA | "
             "checks (switched) |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["phases"]):
        d = r["default"]
        lines.append(f"| {i + 1} | {r['load']} | {r['graph']['median_s']:.3f} | {r['xla']['median_s']:.3f} | "
                     f"{r['xla']['median_s'] / r['graph']['median_s']:.2f} | {d['median_s']:.3f} | "
                     f"{d['xla_steps']} of {FLAGS.phase_steps} | {len(d['checks'])} "
                     f"({sum(c['switched'] for c in d['checks'])}) |")
    t = result["totals"]
    lines.append(f"\nTotals: graph {t['graph']:.1f} s, XLA {t['xla']:.1f} s, default {t['default']:.1f} s; default / "
                 f"better fixed mode {result['default_over_best_fixed']:.3f}, default / phase-by-phase best "
                 f"{result['default_over_oracle']:.3f}")
    return "\n".join(lines)


def main(argv):
    del argv
    from cud_tf import run_dir
    result = run()
    print(json.dumps(result, indent=1))
    print(table(result))
    if FLAGS.out:  # atomically, next to the other runs' files
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        run_dir.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)

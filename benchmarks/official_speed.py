"""cud-tf's train steps against the authors' PyTorch code on the same network, side by side in one run.

    python benchmarks/official_speed.py --reference_code=PATH/Catch-Up-Distillation \
        --reference_python=PATH/venv/bin/python --flagfile=configs/mnist.cfg --out=runs/official_speed.json

--reference_code is a checkout of github.com/shaoshitong/Catch-Up-Distillation (nothing of it is copied into
cud-tf); --reference_python an interpreter with torch, which runs benchmarks/official_worker.py on it. The network
is the --flagfile's (configs/mnist.cfg: the MNIST paper network, the authors' SongUNet; the worker checks that its
parameter count equals cud-tf's). For each --methods step (rf, rf+enc; cudK+enc: CUD of order K with the noise
encoder) the two sides train on a fixed batch of --batch_size (for "forward" they sample it in one step): cud-tf in
graph mode and under XLA (the default, --jit_compile unset, takes the faster of the two by measurement), the
official code in its own process. Each round runs one step of each of the three, in an order that reverses every
round (cud_tf.execution.interleaved_times), so that a slow spell of a shared machine weighs on all alike. Prints
JSON and a markdown table: median seconds and img/s per step, and the better cud-tf mode over the official code.
"""
import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainers import common, cud as cud_trainer  # noqa: E402  (the network flags, which --flagfile sets)

FLAGS = flags.FLAGS
cud_trainer.define_flags()
flags.DEFINE_string("reference_code", None, "Checkout of the authors' repository (Catch-Up-Distillation).")
flags.DEFINE_string("reference_python", sys.executable, "Python interpreter with torch for the official code.")
flags.DEFINE_list("methods", ["rf", "cud1+enc", "cud2+enc", "cud3+enc", "forward"],
                  "Train steps: rf or rf+enc (rectified flow), cudK+enc (CUD of order K = 1, 2, 3 with the noise "
                  "encoder); forward: one-step sampling of the batch.")
flags.DEFINE_integer("batch_size", 128, "Batch of every train step.", lower_bound=1)
flags.DEFINE_integer("rounds", 7, "Timed rounds per step (the medians are reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed rounds first (tracing, XLA compilation, the allocators).", lower_bound=1)
flags.DEFINE_multi_enum("modes", ["graph", "xla"], ["graph", "xla"],
                        "cud-tf's execution modes to time (XLA compilation of the paper network's CUD K >= 2 steps "
                        "at batch 128 needs ~20 GiB of memory).")
flags.DEFINE_string("out", "", "Write the JSON here too.")
flags.mark_flag_as_required("reference_code")
flags.register_validator("methods", bool, "--methods names at least one step")

SIDES = ("cud-tf graph", "cud-tf XLA", "official")


def songunet_kwargs(cfg):
    """The official `network_edm.SongUNet` keyword arguments of cud-tf's reference-form network `cfg`."""
    if cfg.resample != "residual" or cfg.attention_type != "ddpmpp" or cfg.num_classes:
        sys.exit("error: the official code's SongUNet is cud-tf's --resample=residual --attention_type=ddpmpp "
                 "network without labels; use configs/mnist.cfg or another flagfile of that form")
    h, w, c = cfg.image_shape
    if h != w:
        sys.exit(f"error: SongUNet takes square images, got {h}x{w}")
    return dict(img_resolution=h, in_channels=c, out_channels=c, model_channels=cfg.base_channels,
                channel_mult=list(cfg.channel_mult), num_blocks=cfg.num_res_blocks,
                attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout)


class Official:
    """benchmarks/official_worker.py in a subprocess: `step(method)` runs one official train step there."""

    def __init__(self, kwargs, batch):
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_worker.py")
        self.proc = subprocess.Popen([FLAGS.reference_python, worker, FLAGS.reference_code, json.dumps(kwargs),
                                      str(batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"error: the official code's worker exited ({self.proc.wait()}); see its error above")
        return json.loads(line)

    def step(self, method):
        self.proc.stdin.write(json.dumps({"step": method}) + "\n")
        self.proc.stdin.flush()
        return self._read()["value"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def lscpu():
    """lscpu's model name and flags lines (what decides the kernels' speed)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    rows = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: rows[k].strip() for k in ("Model name", "Flags") if k in rows}


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a --flag")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    import speed  # build_model, parse_method
    from cud_tf import data, execution, run_dir, sampling
    from cud_tf.networks.unet import VelocityUNet

    for name in FLAGS.methods:
        if name == "forward":
            continue
        method, order, enc = speed.parse_method(name)
        if method == "cud" and (not enc or order > 3):
            sys.exit(f"error: --methods takes rf, rf+enc and cudK+enc with K = 1, 2, 3 (the official trainers), "
                     f"got {name!r}")
    shape = data.image_shape(common.data_config())
    cfg = common.network_config(shape, num_heads=1, num_classes=max(FLAGS.num_classes, 0))
    kwargs = songunet_kwargs(cfg)
    b = FLAGS.batch_size
    batch = {"image": tf.random.stateless_uniform([b, *shape], seed=[1, 2], minval=-1, maxval=1),
             "label": tf.zeros([b], tf.int32)}
    params = VelocityUNet(cfg).build_variables().count_params()
    official = Official(kwargs, b)
    if official.info["params"] != params:
        sys.exit(f"error: the official SongUNet has {official.info['params']} parameters with {kwargs}, cud-tf's "
                 f"network {params}: not the same network")
    strategy = tf.distribute.get_strategy()
    rows = {}
    report = dict(argv=sys.argv[1:], cpu=lscpu(), cpu_count=os.cpu_count(), tensorflow=tf.__version__,
                  torch=official.info["torch"], torch_threads=official.info["threads"], batch_size=b,
                  network=dict(songunet=kwargs, params=params, encoder_params=official.info["encoder_params"]),
                  rounds=FLAGS.rounds, steps=rows)
    for name in FLAGS.methods:
        fns = {}
        net = VelocityUNet(cfg).build_variables() if name == "forward" else None  # one network for both modes
        for side, xla in zip(SIDES[:2], (False, True)):
            if ("xla" if xla else "graph") not in FLAGS.modes:
                continue
            if name == "forward":
                fns[side] = tf.function(lambda net=net: sampling.generate(net, batch["image"], 1), jit_compile=xla)
                continue
            method, order, enc = speed.parse_method(name)
            model = speed.build_model(cfg, method, order, enc, jit_compile=xla)
            fns[side] = tf.function(lambda model=model: strategy.run(model.train_step, args=(batch,))["loss"])
        fns["official"] = lambda name=name: official.step(name)
        times = execution.interleaved_times(fns, FLAGS.rounds, FLAGS.warmup)
        row = {side: dict(median_s=float(np.median(t)), img_per_s=b / float(np.median(t)), seconds=t)
               for side, t in times.items()}
        best = min((s for s in SIDES[:2] if s in row), key=lambda s: row[s]["median_s"])
        row["cud-tf best"] = best
        row["best_over_official"] = row["official"]["median_s"] / row[best]["median_s"]
        row["best_over_official_paired"] = float(np.exp(-execution.paired_log_ratio(times[best],
                                                                                    times["official"])[0]))
        rows[name] = row
        print(f"{name}: " + ", ".join(f"{s} {row[s]['img_per_s']:.1f} img/s" for s in SIDES if s in row),
              file=sys.stderr, flush=True)
        if FLAGS.out:  # after every step, atomically, so that a long run keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
            run_dir.write_json(FLAGS.out, report)
    official.close()
    print(json.dumps(report, indent=1))
    print("\n| step | cud-tf graph img/s | cud-tf XLA img/s | official img/s | better cud-tf / official "
          "(medians; paired) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[s]['img_per_s']:.1f}" if s in r else "-" for s in SIDES)
              + f" | {r['best_over_official']:.2f}x; {r['best_over_official_paired']:.2f}x |")


if __name__ == "__main__":
    app.run(main)

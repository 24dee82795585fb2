"""Does bf16 training reach fp32's quality? The quickstart recipe (--base_flagfile) trained under each of
--precisions with each of --seeds (same network, iterations and batch), every run evaluated by `trainers.evaluate`
at the same NFEs with the same noise and sample count (sampling in float32). Prints JSON and a table: each run's
distance per NFE, each precision's mean and seed spread (max - min), and the gap between the precisions' means
beside the larger spread; writes bf16_parity.json / .md in --out_dir.

    python benchmarks/bf16_parity.py --out_dir=runs/bf16_parity --train_steps=500 --num_samples=2000

The runs, their resume and the evaluation cache are benchmarks/quality_mnist.py's (a rerun reuses finished runs).
"""
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_mnist as q  # noqa: E402  (its flags: --out_dir, --base_flagfile, --train_steps, --nfe, ...)

FLAGS = flags.FLAGS
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Training precisions to compare.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds of each precision.")


def spread(values):
    return max(values) - min(values)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a --flag")
    out = os.path.abspath(FLAGS.out_dir)
    nfes = [str(k) for k in FLAGS.nfe]
    runs = []
    for precision in FLAGS.precisions:
        for seed in FLAGS.seeds:
            run_dir = os.path.join(out, f"{precision}_seed{seed}")
            q.train("trainers.cud", run_dir, FLAGS.train_steps, f"--flagfile={FLAGS.base_flagfile}",
                    f"--train_steps={FLAGS.train_steps}", f"--global_batch_size={FLAGS.global_batch_size}",
                    f"--seed={seed}", f"--precision={precision}", "--noprogress", *FLAGS.train_flag)
            with open(os.path.join(run_dir, "flags.txt")) as f:  # what ran (the resolved --precision)
                recorded = next((line.strip().split("=", 1)[1] for line in f if line.startswith("--precision=")),
                                None)
            if recorded != precision:
                sys.exit(f"error: {run_dir} trained under {recorded}, not {precision}: remove it or pick another "
                         "--out_dir")
            result = q.evaluate(run_dir, 1)
            runs.append(dict(precision=precision, seed=int(seed), run_dir=run_dir,
                             train_seconds=q.train_seconds(run_dir),
                             distance={str(r["nfe"]): r["distance"] for r in result["rows"]}))
            metric = result["metric"]
    summary = {}
    for precision in FLAGS.precisions:
        mine = [r for r in runs if r["precision"] == precision]
        summary[precision] = {k: dict(mean=sum(r["distance"][k] for r in mine) / len(mine),
                                      spread=spread([r["distance"][k] for r in mine])) for k in nfes}
    a, b = FLAGS.precisions[0], FLAGS.precisions[-1]
    gap = {k: dict(gap=summary[b][k]["mean"] - summary[a][k]["mean"],
                   noise=max(summary[a][k]["spread"], summary[b][k]["spread"])) for k in nfes}
    lines = [f"| run | {' | '.join(f'NFE {k}' for k in nfes)} | train s |", "|---" * (len(nfes) + 2) + "|"]
    for r in runs:
        cells = " | ".join(f"{r['distance'][k]:.2f}" for k in nfes)
        lines.append(f"| {r['precision']}, seed {r['seed']} | {cells} | {r['train_seconds']:.0f} |")
    for precision in FLAGS.precisions:
        cells = " | ".join(f"{summary[precision][k]['mean']:.2f} ± {summary[precision][k]['spread'] / 2:.2f}"
                           for k in nfes)
        lines.append(f"| {precision}: mean ± half the seed spread | {cells} | |")
    cells = " | ".join(f"{gap[k]['gap']:+.2f} (noise {gap[k]['noise']:.2f})" for k in nfes)
    lines.append(f"| {b} − {a} (largest seed spread) | {cells} | |")
    text = (f"{metric}, Euler, {FLAGS.num_samples} samples; {FLAGS.base_flagfile}, {FLAGS.train_steps} iterations, "
            f"batch {FLAGS.global_batch_size}\n\n" + "\n".join(lines) + "\n")
    result = dict(metric=metric, num_samples=FLAGS.num_samples, train_steps=FLAGS.train_steps, runs=runs,
                  summary=summary, gap=gap)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bf16_parity.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "bf16_parity.md"), "w") as f:
        f.write(text)
    print(json.dumps(result))
    print(text)


if __name__ == "__main__":
    app.run(main)

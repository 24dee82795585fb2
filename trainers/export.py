"""Exports a run's EMA weights as a versioned SavedModel for TF Serving.

`python -m trainers.export --run_dir=runs/x --name=cud_mnist` writes `saved_models/cud_mnist/<next version>/`;
docs/serving.md shows how to serve and query it.
"""
import functools

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


# This tool's own flags: not settings of a training run (never in its flags.txt).
_define = functools.partial(common.define, record=False)


def define_flags():
    d = flags
    _define(d.DEFINE_string, "run_dir", None, "Run directory written by a trainer (arch.json, checkpoints/).")
    _define(d.DEFINE_string, "name", None, "Model name: the export goes to <export_dir>/<name>/<version>/.")
    _define(d.DEFINE_string, "export_dir", "saved_models", "Base directory of the exported models.")
    _define(d.DEFINE_string, "checkpoint", None, "Checkpoint path to export (default: the run's latest).")
    _define(d.DEFINE_string, "sampler", "euler", "Fixed-step sampler: euler, heun, rk3, rk4, reference3.")
    _define(d.DEFINE_integer, "head", 1, "Head g_k that drives the sampler (1-based).", lower_bound=1)
    _define(d.DEFINE_enum, "grid", "uniform", ["uniform", "quadratic"], "Time grid of the sampler.")
    _define(d.DEFINE_integer, "default_steps", 1, "Sampler steps of the serving_default signature.", lower_bound=1)
    _define(d.DEFINE_integer, "max_images", 64, "Largest batch / num_images a request may ask for.", lower_bound=1)
    _define(d.DEFINE_integer, "max_steps", 64, "Largest num_steps a generate request may ask for.", lower_bound=1)
    _define(d.DEFINE_float, "max_guidance", 10.0, "Largest guidance_scale (class-conditional runs).",
            lower_bound=0.0)
    _define(d.DEFINE_list, "signatures", ["serving_default", "generate", "velocity"],
            "Signatures to export (e.g. serving_default alone: a fixed --default_steps model).")
    _define(d.DEFINE_boolean, "warmup", True, "Write assets.extra/tf_serving_warmup_requests, one request per "
            "signature, that TF Serving runs on load (needs tensorflow-serving-api).")


def run():
    """Exports from the flags; returns the path of the new version."""
    from cud_tf import export

    if not FLAGS.run_dir:
        raise flags.ValidationError("--run_dir is required (the training run to export)")
    if not FLAGS.name:
        raise flags.ValidationError("--name is required (the model name TF Serving serves, e.g. cud_mnist)")
    cfg = export.ExportConfig(sampler=FLAGS.sampler, head=FLAGS.head, grid=FLAGS.grid,
                              default_steps=FLAGS.default_steps, max_images=FLAGS.max_images,
                              max_steps=FLAGS.max_steps, max_guidance=FLAGS.max_guidance,
                              signatures=tuple(FLAGS.signatures), warmup=FLAGS.warmup)
    return export.export_run(FLAGS.run_dir, FLAGS.export_dir, FLAGS.name, cfg, checkpoint=FLAGS.checkpoint)


def main(argv):
    print(f"exported {common.run_or_fail(argv, run, OSError)}")


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

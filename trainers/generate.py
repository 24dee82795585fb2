"""Sample grids at several NFEs: `python -m trainers.generate --run_dir=RUN --nfe=1,2,4 --num_images=64`,
or the same with `--saved_model=saved_models/cud_mnist/1` (through the export's serving signatures only).

Writes <out>.png (one labelled block of --num_images images per NFE, upscaled to be readable), <out>.npy
(float32 [len(nfe), num_images, H, W, C] in [-1, 1], rows in --nfe order) and <out>.json (what was sampled
and how). The noise comes from --seed as in the export's `generate` signature, so a run and its export give
the same images. See cud_tf/generation.py.
"""
import functools

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


# This tool's own flags: not settings of a training run (never in its flags.txt).
_define = functools.partial(common.define, record=False)


def define_flags():
    d = flags
    _define(d.DEFINE_string, "run_dir", None, "Training run to sample with its EMA weights (arch.json, "
            "checkpoints/).")
    _define(d.DEFINE_string, "saved_model", None, "Or: an exported version folder, e.g. saved_models/cud_mnist/1 "
            "(a model's folder: its latest version).")
    _define(d.DEFINE_string, "checkpoint", None, "Checkpoint of --run_dir (default: the latest).")
    _define(d.DEFINE_list, "nfe", ["1", "2", "4"], "Numbers of velocity evaluations: one grid block per value.")
    _define(d.DEFINE_string, "sampler", "euler", "Fixed-step sampler: euler, heun, rk3, rk4, reference3 (with "
            "--saved_model, when not given: the export's).")
    _define(d.DEFINE_integer, "head", 1, "Head g_k (1-based; with --saved_model, when not given: the export's).",
            lower_bound=1)
    _define(d.DEFINE_integer, "seed", 0, "Noise seed (the generate signature's).")
    _define(d.DEFINE_integer, "num_images", 64, "Images per NFE.", lower_bound=1)
    _define(d.DEFINE_list, "labels", [], "Class ids cycled over the images (-1 = unconditional; default 0, 1, ...; "
            "class-conditional models only).")
    # A list (of one value) so that it agrees with trainers.evaluate's flag of the same name in one process.
    _define(d.DEFINE_list, "guidance_scale", ["1.0"], "Classifier-free guidance scale w (one value; 1 = plain "
            "conditional; class-conditional models only).")
    _define(d.DEFINE_string, "out", None, "Output path prefix (<out>.png, .npy, .json) or a directory (ending in "
            "/ or existing). Default: <run_dir>/generate/ or generated/.")
    _define(d.DEFINE_integer, "scale", 0, "Upscaling of the grid's images (0: automatic, >= 512 px wide).",
            lower_bound=0)


def config():
    """GenerateConfig from the flags; None for sampler/head not given with --saved_model (the export's)."""
    from cud_tf.generation import GenerateConfig

    from_export = bool(FLAGS.saved_model)
    if len(FLAGS.guidance_scale) != 1:
        raise flags.ValidationError(f"--guidance_scale takes one value here, got {FLAGS.guidance_scale}")
    try:
        w = float(FLAGS.guidance_scale[0])
    except ValueError:
        raise flags.ValidationError(f"--guidance_scale must be a number, got {FLAGS.guidance_scale[0]!r}") from None
    return GenerateConfig(
        nfes=common.int_list(FLAGS.nfe, "nfe"),
        sampler=None if from_export and not FLAGS["sampler"].present else FLAGS.sampler,
        head=None if from_export and not FLAGS["head"].present else FLAGS.head,
        seed=FLAGS.seed, num_images=FLAGS.num_images, labels=common.int_list(FLAGS.labels, "labels"),
        guidance_scale=w)


def run():
    """Samples from the flags; returns the paths written (png, npy, json)."""
    from cud_tf import generation

    if bool(FLAGS.run_dir) == bool(FLAGS.saved_model):
        raise flags.ValidationError("pass exactly one of --run_dir (a training run) and --saved_model (an export)")
    cfg = config()
    if FLAGS.saved_model:
        generated = generation.generate_from_saved_model(FLAGS.saved_model, cfg)
        default_dir = "generated"
    else:
        generated = generation.generate_from_run(FLAGS.run_dir, cfg, checkpoint=FLAGS.checkpoint)
        default_dir = f"{FLAGS.run_dir.rstrip('/')}/generate"
    info = generated.info
    prefix = generation.output_prefix(FLAGS.out, default_dir, info["sampler"], info["head"], cfg.seed)
    return generation.write(generated, prefix, scale=FLAGS.scale or None)


def main(argv):
    import tensorflow as tf
    paths = common.run_or_fail(argv, run, OSError, tf.errors.OpError)
    print("wrote " + " ".join(paths))


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

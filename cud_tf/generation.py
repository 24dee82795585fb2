"""Samples at several NFEs from a training run or from an exported SavedModel, as one grid and one array.

`generate_from_run` samples in-process with the run's EMA weights; `generate_from_saved_model` goes through
the SavedModel's serving signatures (`cud_tf.export`) only. Both draw the noise z `[N, H, W, C]` with
`cud_tf.export.noise(seed, N, image_shape)` -- the noise of the `generate` signature -- so a run and its export
give the same images for the same seed, NFE and sampler. `write` saves the result as
`<prefix>.png` (`summaries.sample_grid`: one labelled block per NFE), `<prefix>.npy` (float32
`[len(nfes), N, H, W, C]` in [-1, 1]: axis 0 follows `nfes`, axis 1 the image index) and `<prefix>.json`.
"""
import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from cud_tf import export, solvers, summaries


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What to sample. sampler/head None: euler and head 1 for a run, the export's own for a SavedModel."""

    nfes: tuple = (1, 2, 4)  # one grid block / array row per NFE (velocity evaluations per image)
    sampler: str | None = None  # a solvers.TABLEAUX name
    head: int | None = None  # 1-based head g_head
    seed: int = 0  # noise seed (`cud_tf.export.noise`)
    num_images: int = 64  # N
    labels: tuple = ()  # class ids (-1 = unconditional), cycled to N; () = i % num_classes (conditional only)
    guidance_scale: float = 1.0  # classifier-free guidance w (conditional only; 1 = plain conditional)

    def validate(self):
        if not self.nfes or any(int(n) < 1 for n in self.nfes):
            raise ValueError(f"nfe={list(self.nfes)}: expected one or more integers >= 1")
        if self.num_images < 1:
            raise ValueError(f"num_images={self.num_images} must be >= 1")
        if self.sampler is not None and self.sampler not in solvers.TABLEAUX:
            raise ValueError(f"sampler={self.sampler!r} is unknown; expected one of {sorted(solvers.TABLEAUX)}")
        if self.head is not None and self.head < 1:
            raise ValueError(f"head={self.head} must be >= 1 (1-based)")
        if not self.guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 0")


@dataclasses.dataclass
class Generated:
    samples: np.ndarray  # float32 [len(nfes), N, H, W, C] in [-1, 1]
    info: dict  # source, sampler, head, seed, labels, guidance_scale and per row: nfe, steps, how it was sampled


def steps_for(sampler, nfe):
    """The step count whose NFE is exactly `nfe` with `sampler`; ValueError naming the reachable NFEs if none."""
    steps = solvers.steps_for_nfe(sampler, nfe) if nfe >= solvers.nfe(sampler, 1) else 0
    if steps < 1 or solvers.nfe(sampler, steps) != nfe:
        reachable = ", ".join(str(solvers.nfe(sampler, k)) for k in range(1, 5))
        raise ValueError(f"NFE {nfe} is not reachable with the {sampler} sampler (its NFEs: {reachable}, ...)")
    return steps


def resolve_labels(cfg: GenerateConfig, num_classes):
    """Labels int32 `[N]` for a conditional network (None for an unconditional one), checked."""
    if not num_classes:
        if cfg.labels or cfg.guidance_scale != 1.0:
            raise ValueError("--labels and --guidance_scale need a class-conditional model; this one is "
                             "unconditional")
        return None
    base = np.asarray(cfg.labels or range(num_classes), np.int32)
    if base.min() < -1 or base.max() >= num_classes:
        raise ValueError(f"labels={list(cfg.labels)} must lie in [-1, {num_classes - 1}] (-1 = unconditional)")
    return np.resize(base, cfg.num_images)


def _info(cfg, source, sampler, head, labels, rows):
    return {"source": source, "sampler": sampler, "head": head, "seed": cfg.seed, "num_images": cfg.num_images,
            "labels": None if labels is None else labels.tolist(), "guidance_scale": cfg.guidance_scale,
            "rows": rows, "samples": "float32 [len(nfes), num_images, H, W, C] in [-1, 1]"}


def generate_from_run(run_dir, cfg: GenerateConfig, checkpoint=None) -> Generated:
    """Samples every NFE of `cfg.nfes` in-process with the EMA weights of a training run."""
    from cud_tf import sampling
    from cud_tf import run_dir as run_dir_lib

    cfg.validate()
    sampler, head = cfg.sampler or "euler", cfg.head or 1
    net_cfg = run_dir_lib.read_arch(run_dir)[0]
    if head > net_cfg.num_heads:
        raise ValueError(f"head={head} but the network has {net_cfg.num_heads} head(s) (1-based)")
    labels = resolve_labels(cfg, net_cfg.num_classes)
    steps = [steps_for(sampler, int(n)) for n in cfg.nfes]  # before the (slower) restore
    run = run_dir_lib.load_run(run_dir, weights="ema", checkpoint=checkpoint)
    z = export.noise(cfg.seed, cfg.num_images, net_cfg.image_shape)
    y = None if labels is None else tf.constant(labels)
    # One trace for every row: the step count is a tensor, so the sampler runs as a tf.while_loop.
    fn = tf.function(lambda n: tf.clip_by_value(sampling.generate(
        run.net, z, n, sampler, head, y, cfg.guidance_scale), *export.VALUE_RANGE))
    samples = np.stack([fn(tf.constant(k)).numpy() for k in steps])
    rows = [{"nfe": int(n), "steps": k, "how": "in-process"} for n, k in zip(cfg.nfes, steps)]
    source = {"run_dir": os.path.abspath(run_dir), "checkpoint": run.checkpoint, "step": run.step, "weights": "ema"}
    return Generated(samples, _info(cfg, source, sampler, head, labels, rows))


class _SavedModel:
    """A cud_tf export: its signatures and the facts of assets.extra/cud_tf.json."""

    def __init__(self, path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")) and export.next_version(path) > 1:
            path = os.path.join(path, str(export.next_version(path) - 1))  # a model's base folder: its latest
        meta_path = os.path.join(path, export.METADATA_FILE)
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path} is not a SavedModel version folder (no saved_model.pb); pass "
                             "--saved_model=<export_dir>/<name>/<version>")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path} has no {export.METADATA_FILE}: not an export of trainers.export")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.path = path
        self.signatures = tf.saved_model.load(path).signatures
        self.image_shape = tuple(self.meta["image"]["shape"])
        self.num_classes = self.meta["num_classes"]
        self.sampler, self.head = self.meta["sampler"]["method"], self.meta["sampler"]["head"]
        self.grid, self.default_steps = self.meta["sampler"]["grid"], self.meta["sampler"]["default_steps"]
        self.max_images, self.max_steps = self.meta["caps"]["max_images"], self.meta["caps"]["max_steps"]

    def describe(self):
        parts = []
        if "serving_default" in self.signatures:
            parts.append(f"serving_default ({self.sampler}, {self.default_steps} step(s) = NFE "
                         f"{solvers.nfe(self.sampler, self.default_steps)})")
        if "generate" in self.signatures:
            parts.append(f"generate ({self.sampler}, up to {self.max_steps} steps and {self.max_images} images)")
        return ", ".join(parts) or "no sampling signature"

    def plan(self, sampler, steps, num_images):
        """The signature that samples `steps` steps of `sampler` for N images, or None."""
        if sampler == self.sampler:
            if steps == self.default_steps and "serving_default" in self.signatures:
                return "serving_default"  # takes our noise, so any N (in batches of max_images)
            if "generate" in self.signatures and steps <= self.max_steps and num_images <= self.max_images:
                return "generate"  # draws the same noise from the seed
        return "velocity" if "velocity" in self.signatures else None

    def conditioning(self, labels, w):
        if labels is None:
            return {}
        return {"labels": tf.constant(labels), "guidance_scale": tf.constant(w, tf.float32)}

    def sample(self, how, z, steps, sampler, seed, labels, w):
        """Images `[N, H, W, C]` from noise z `[N, H, W, C]` (generate: the same noise, drawn from seed)."""
        if how == "generate":
            out = self.signatures["generate"](seed=tf.constant(seed, tf.int64), num_images=tf.constant(len(z)),
                                              num_steps=tf.constant(steps), **self.conditioning(labels, w))
            return out["images"].numpy()
        batches = []
        for i in range(0, len(z), self.max_images):
            zb = tf.constant(z[i:i + self.max_images])
            yb = None if labels is None else labels[i:i + self.max_images]
            if how == "serving_default":
                batches.append(self.signatures[how](noise=zb, **self.conditioning(yb, w))["images"].numpy())
            else:
                x = solvers.sample(self._velocity(yb, w), zb, steps, method=sampler, grid=self.grid)
                batches.append(np.clip(x.numpy(), *export.VALUE_RANGE))
        return np.concatenate(batches)

    def _velocity(self, labels, w):
        """v(x, t) through the velocity signature, with classifier-free guidance as in `sampling.velocity_fn`."""
        fn = self.signatures["velocity"]
        if labels is None:
            return lambda x, t: fn(x=x, t=t)["v"]
        y, null = tf.constant(labels), tf.fill([len(labels)], -1)
        if w == 1.0:
            return lambda x, t: fn(x=x, t=t, labels=y)["v"]

        def guided(x, t):
            v_uncond = fn(x=x, t=t, labels=null)["v"]
            return v_uncond + w * (fn(x=x, t=t, labels=y)["v"] - v_uncond)

        return guided


def generate_from_saved_model(path, cfg: GenerateConfig) -> Generated:
    """Samples every NFE of `cfg.nfes` through the signatures of an export (`<export_dir>/<name>/<version>`,
    or `<export_dir>/<name>`: its latest version, as TF Serving would serve).

    An NFE of the export's own sampler uses serving_default (its default step count) or generate; another
    sampler or step count needs the velocity signature (the sampler then runs here). ValueError, before any
    sampling, for an NFE the export cannot do, a head other than the exported one, or labels out of range.
    """
    cfg.validate()
    model = _SavedModel(path)
    if cfg.head is not None and cfg.head != model.head:
        raise ValueError(f"{model.path} was exported with head {model.head} (its signatures run only that "
                         f"head); drop --head or export the run again with --head={cfg.head}")
    sampler = cfg.sampler or model.sampler
    labels = resolve_labels(cfg, model.num_classes)
    if labels is not None and cfg.guidance_scale > model.meta["caps"]["max_guidance"]:
        raise ValueError(f"guidance_scale={cfg.guidance_scale} exceeds the export's max_guidance="
                         f"{model.meta['caps']['max_guidance']}")
    plans = []
    for n in cfg.nfes:
        steps = steps_for(sampler, int(n))
        how = model.plan(sampler, steps, cfg.num_images)
        if how is None:
            raise ValueError(f"{model.path} cannot sample NFE {n} with {sampler} for {cfg.num_images} images: it "
                             f"exports {model.describe()} and no velocity signature")
        plans.append((int(n), steps, how))
    z = export.noise(cfg.seed, cfg.num_images, model.image_shape).numpy()
    samples = np.stack([model.sample(how, z, steps, sampler, cfg.seed, labels, cfg.guidance_scale)
                        for _, steps, how in plans])
    rows = [{"nfe": n, "steps": steps, "how": f"signature {how}"} for n, steps, how in plans]
    source = {"saved_model": os.path.abspath(model.path), "name": model.meta.get("name"),
              "version": model.meta.get("version")}
    return Generated(samples.astype(np.float32), _info(cfg, source, sampler, model.head, labels, rows))


def output_prefix(out, default_dir, sampler, head, seed):
    """`out` as a path prefix: a directory (existing, or ending in '/') gets samples_<sampler>_head<k>_seed<s>."""
    out = out or default_dir + os.sep
    if out.endswith(os.sep) or os.path.isdir(out):
        out = os.path.join(out, f"samples_{sampler}_head{head}_seed{seed}")
    return out[:-4] if out.endswith((".png", ".npy")) else out


def write(generated: Generated, prefix, scale=None):
    """Writes <prefix>.png (the grid), <prefix>.npy (the samples) and <prefix>.json (the info); returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    nfes = [r["nfe"] for r in generated.info["rows"]]
    grid = summaries.sample_grid(list(generated.samples), nfes, scale=scale)
    paths = [prefix + ".png", prefix + ".npy", prefix + ".json"]
    summaries.write_png(paths[0], grid)
    np.save(paths[1], generated.samples)
    with open(paths[2], "w") as f:
        json.dump({**generated.info, "shape": list(generated.samples.shape), "png_shape": list(grid.shape)}, f,
                  indent=1)
    return paths

"""Versioned SavedModels of a velocity network for TF Serving: `<export_dir>/<name>/<integer version>/`.

Signatures (method `tensorflow/serving/predict`; H, W, C are the network's image shape):
  serving_default  noise float32 [B, H, W, C] -> images float32 [B, H, W, C] in [-1, 1], images_uint8 uint8
                   (`default_steps` steps of the export's sampler; 1 Euler step is the one-step map z - v(z, 1))
  generate         seed int64 [], num_images int32 [], num_steps int32 [] -> images, images_uint8 (noise drawn
                   statelessly from the seed: the same seed gives the same images)
  velocity         x float32 [B, H, W, C], t float32 [B] -> v float32 [B, H, W, C] (the export's head)
Class-conditional networks add labels int32 [B] (-1 = unconditional) to all three and guidance_scale float32 []
to the first two. Inputs are checked inside the graph, before any network evaluation, so a bad request fails
with a message naming the input and what it must be. Only TensorFlow ops are saved: loading needs no cud_tf.
`ExportConfig.signatures` may leave some out (e.g. only serving_default: a fixed one-step model).

Every version also holds `assets.extra/tf_serving_warmup_requests`: a TFRecord of `PredictionLog` records, one
small valid `PredictRequest` per signature, that TF Serving runs once when it loads the version (so the first
real request does not pay for graph set-up). Writing it needs `tensorflow-serving-api` (the `serving` extra).
"""
import dataclasses
import datetime
import json
import os
import re
import subprocess

import numpy as np
import tensorflow as tf

from cud_tf import sampling, solvers

METADATA_FILE = os.path.join("assets.extra", "cud_tf.json")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")  # the name TF Serving looks for
VALUE_RANGE = (-1.0, 1.0)
SIGNATURES = ("serving_default", "generate", "velocity")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the signatures compute and the caps they enforce."""

    sampler: str = "euler"  # a solvers.TABLEAUX name
    head: int = 1  # head g_head (1-based) drives every signature
    grid: str = "uniform"  # solvers.GRIDS
    default_steps: int = 1  # sampler steps of serving_default
    max_images: int = 64  # largest batch B / num_images
    max_steps: int = 64  # largest num_steps of generate
    max_guidance: float = 10.0  # largest guidance_scale (class-conditional networks)
    signatures: tuple = SIGNATURES  # which of SIGNATURES the SavedModel exposes
    warmup: bool = True  # write assets.extra/tf_serving_warmup_requests (needs tensorflow-serving-api)

    def validate(self, net_config):
        """Raises ValueError naming the offending field."""
        if self.sampler not in solvers.TABLEAUX:
            raise ValueError(f"sampler={self.sampler!r} is unknown; expected one of {sorted(solvers.TABLEAUX)}")
        if self.grid not in solvers.GRIDS:
            raise ValueError(f"grid={self.grid!r}; expected one of {solvers.GRIDS}")
        if not 1 <= self.head <= net_config.num_heads:
            raise ValueError(f"head={self.head} but the network has {net_config.num_heads} head(s) (1-based)")
        for name in ("default_steps", "max_images", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} exceeds max_steps={self.max_steps}")
        if not self.max_guidance >= 0.0:
            raise ValueError(f"max_guidance={self.max_guidance} must be >= 0")
        unknown = sorted(set(self.signatures) - set(SIGNATURES))
        if unknown or not self.signatures:
            raise ValueError(f"signatures={list(self.signatures)}: expected a non-empty subset of {list(SIGNATURES)}")
        if self.warmup:
            try:
                from tensorflow_serving.apis import prediction_log_pb2  # noqa: F401
            except ImportError:
                raise ValueError("writing TF Serving warm-up requests needs tensorflow-serving-api (pip install "
                                 "--no-deps tensorflow-serving-api==2.21.0), or export without them (--nowarmup)"
                                 ) from None


def noise(seed, num_images, image_shape):
    """The noise z `[num_images, H, W, C]` that `generate` draws for `seed` (int64 scalar)."""
    seed = tf.cast(seed, tf.int64)
    return tf.random.stateless_normal(tf.concat([[num_images], list(image_shape)], 0), seed=tf.stack([seed, 0]))


def to_uint8(images):
    """Images in [-1, 1] -> uint8 pixels round((x + 1) * 127.5), the inverse of the data pipeline's x / 127.5 - 1."""
    return tf.cast(tf.round((tf.clip_by_value(images, *VALUE_RANGE) + 1.0) * 127.5), tf.uint8)


def _check(condition, message, *values):
    return tf.debugging.Assert(condition, [message, *values], summarize=8)


def _after(checks, *tensors):
    """The tensors, gated on the checks: nothing computed from them runs before every check has passed."""
    with tf.control_dependencies(checks):
        return [None if x is None else tf.identity(x) for x in tensors]


def _scalar_in(x, name, low, high):
    """Checks that x is a scalar in [low, high]."""
    return [
        _check(tf.equal(tf.rank(x), 0), f"{name} must be a scalar; got shape", tf.shape(x)),
        _check(tf.reduce_all((x >= low) & (x <= high)), f"{name} must lie in [{low}, {high}]; got", x),
    ]


class Signatures:
    """The three serving signatures of a velocity network as `tf.function`s (see the module docstring)."""

    def __init__(self, net, cfg: ExportConfig):
        cfg.validate(net.config)
        self.net = net
        self.cfg = cfg
        self.image_shape = tuple(net.config.image_shape)
        self.num_classes = net.config.num_classes
        h, w, c = self.image_shape
        spec = lambda shape, dtype, name: tf.TensorSpec(shape, dtype, name=name)  # noqa: E731
        cond = [spec([None], tf.int32, "labels")] if self.num_classes else []
        guidance = [spec([], tf.float32, "guidance_scale")] if self.num_classes else []

        # Unconditional networks trace these with only the leading specs; labels/guidance_scale stay None.
        def default(noise, labels=None, guidance_scale=None):
            return self._default(noise, labels, guidance_scale)

        def generate(seed, num_images, num_steps, labels=None, guidance_scale=None):
            return self._generate(seed, num_images, num_steps, labels, guidance_scale)

        def velocity(x, t, labels=None):
            return self._velocity(x, t, labels)

        self.serving_default = tf.function(default, autograph=False, input_signature=[
            spec([None, h, w, c], tf.float32, "noise"), *cond, *guidance])
        self.generate = tf.function(generate, autograph=False, input_signature=[
            spec([], tf.int64, "seed"), spec([], tf.int32, "num_images"), spec([], tf.int32, "num_steps"), *cond,
            *guidance])
        self.velocity = tf.function(velocity, autograph=False, input_signature=[
            spec([None, h, w, c], tf.float32, "x"), spec([None], tf.float32, "t"), *cond])

    def concrete(self):
        """{signature name: concrete function} of `cfg.signatures`, traced once."""
        return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES
                if name in self.cfg.signatures}

    def warmup_inputs(self, name):
        """{input name: numpy value}: the smallest valid request of signature `name` (one image, the default
        step count, label 0, guidance 1)."""
        h, w, c = self.image_shape
        values = {
            "noise": np.zeros([1, h, w, c], np.float32), "x": np.zeros([1, h, w, c], np.float32),
            "t": np.ones([1], np.float32), "seed": np.int64(0), "num_images": np.int32(1),
            "num_steps": np.int32(self.cfg.default_steps), "labels": np.zeros([1], np.int32),
            "guidance_scale": np.float32(1.0)}
        args, _ = getattr(self, name).get_concrete_function().structured_input_signature
        return {s.name: values[s.name] for s in args if s is not None}

    # Checks: each returns a list of assert ops that the computation waits on.

    def _check_images(self, x, name):
        h, w, c = self.image_shape
        shape = tf.shape(x)
        return [
            _check(tf.equal(tf.rank(x), 4), f"{name} must have shape [B, {h}, {w}, {c}]; got shape", shape),
            _check(tf.reduce_all(tf.equal(shape[1:], [h, w, c])),
                   f"{name} must have shape [B, {h}, {w}, {c}]; got shape", shape),
            _check((shape[0] >= 1) & (shape[0] <= self.cfg.max_images),
                   f"{name}: batch B must lie in [1, {self.cfg.max_images}] (--max_images); got", shape[0]),
            _check(tf.reduce_all(tf.math.is_finite(x)), f"{name} must be finite; got NaN or Inf"),
        ]

    def _check_condition(self, labels, guidance_scale, batch, batch_name):
        if not self.num_classes:
            return []
        checks = [
            _check(tf.equal(tf.rank(labels), 1) & tf.equal(tf.size(labels), batch),
                   f"labels must have shape [{batch_name}]; got shape", tf.shape(labels), batch_name, batch),
            _check(tf.reduce_all((labels >= -1) & (labels < self.num_classes)),
                   f"labels must lie in [-1, {self.num_classes - 1}] (-1 = unconditional); got", labels),
        ]
        if guidance_scale is not None:
            checks += _scalar_in(guidance_scale, "guidance_scale", 0.0, self.cfg.max_guidance)
        return checks

    # Computations.

    def _sample(self, z, num_steps, labels, guidance_scale):
        images = sampling.generate(self.net, z, num_steps, self.cfg.sampler, self.cfg.head, labels,
                                   guidance_scale if self.num_classes else 1.0, self.cfg.grid)
        images = tf.clip_by_value(images, *VALUE_RANGE)
        return {"images": images, "images_uint8": to_uint8(images)}

    def _default(self, noise, labels, guidance_scale):
        checks = self._check_images(noise, "noise") + self._check_condition(
            labels, guidance_scale, tf.shape(noise)[0], "B (the batch of noise)")
        z, labels, guidance_scale = _after(checks, noise, labels, guidance_scale)
        return self._sample(z, self.cfg.default_steps, labels, guidance_scale)

    def _generate(self, seed, num_images, num_steps, labels, guidance_scale):
        checks = (
            [_check(tf.equal(tf.rank(seed), 0), "seed must be a scalar; got shape", tf.shape(seed))]
            + _scalar_in(num_images, "num_images", 1, self.cfg.max_images)
            + _scalar_in(num_steps, "num_steps", 1, self.cfg.max_steps))
        seed, num_images, num_steps = _after(checks, seed, num_images, num_steps)
        checks = self._check_condition(labels, guidance_scale, num_images, "num_images")
        seed, num_images, num_steps, labels, guidance_scale = _after(
            checks, seed, num_images, num_steps, labels, guidance_scale)
        return self._sample(noise(seed, num_images, self.image_shape), num_steps, labels, guidance_scale)

    def _velocity(self, x, t, labels):
        batch = tf.shape(x)[0]
        checks = self._check_images(x, "x") + [
            _check(tf.equal(tf.rank(t), 1) & tf.equal(tf.size(t), batch),
                   "t must have shape [B] (the batch of x); got shape", tf.shape(t), "B", batch),
            _check(tf.reduce_all((t >= 0.0) & (t <= 1.0)), "t must lie in [0, 1] (1 = noise, 0 = data); got", t),
        ] + self._check_condition(labels, None, batch, "B (the batch of x)")
        x, t, labels = _after(checks, x, t, labels)
        v = sampling.velocity_fn(self.net, self.cfg.head, labels)(x, t)
        return {"v": v}


def versions(base_dir) -> list:
    """The integer-named (version) folders of base_dir, ascending ([] when it does not exist)."""
    return sorted(int(d) for d in os.listdir(base_dir) if d.isdigit()) if os.path.isdir(base_dir) else []


def next_version(base_dir) -> int:
    """1 + the largest version in base_dir (1 when there is none)."""
    return max(versions(base_dir), default=0) + 1


def find_export(base_dir, run_dir, checkpoint):
    """The version folder under base_dir exported from checkpoint `checkpoint` of run `run_dir`, or None."""
    for version in map(str, versions(base_dir)):
        try:
            with open(os.path.join(base_dir, version, METADATA_FILE)) as f:
                run = json.load(f).get("run", {})
        except (OSError, ValueError):
            continue
        if run.get("run_dir") == os.path.abspath(run_dir) and run.get("checkpoint") == checkpoint:
            return os.path.join(base_dir, version)
    return None


def code_version() -> str:
    """`git describe` of the source tree when it is a git checkout with commits, else the package version."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib import metadata
        return "cud-tf " + metadata.version("cud-tf")
    except Exception:  # noqa: BLE001 (not installed: metadata raises PackageNotFoundError)
        return "unknown (no git commit, package not installed)"


def _describe(fn):
    """{inputs: {name: [dtype, shape]}, outputs: {...}} of a concrete function (shape -1 = any)."""
    spec = lambda s: [s.dtype.name, [-1 if d is None else d for d in s.shape.as_list()]]  # noqa: E731
    args, _ = fn.structured_input_signature
    return {"inputs": {s.name: spec(s) for s in args if s is not None},
            "outputs": {k: spec(s) for k, s in sorted(fn.structured_outputs.items())}}


def check_name(name):
    """A model name is one folder name that TF Serving's model config accepts."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '-' or '.', not starting with '.'")


def write_warmup(path, sigs: Signatures, name):
    """Writes TF Serving's warm-up file `path`: one PredictionLog (a PredictRequest of model `name` and its
    `Signatures.warmup_inputs`) per exported signature. Returns the signature names, in file order."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    names = [n for n in SIGNATURES if n in sigs.cfg.signatures]
    with tf.io.TFRecordWriter(path) as writer:
        for signature in names:
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.signature_name = name, signature
            for key, value in sigs.warmup_inputs(signature).items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return names


def export(net, export_dir, name, cfg: ExportConfig, info=None):
    """Writes `<export_dir>/<name>/<next version>/` (SavedModel + assets.extra/cud_tf.json); returns its path.

    The SavedModel is written to a hidden temporary folder and renamed into place, so TF Serving never sees
    a partial version and an existing version is never overwritten. info: extra JSON-able metadata (the run).
    """
    check_name(name)
    sigs = Signatures(net, cfg)
    signatures = sigs.concrete()
    # The root holds only the variables (saving the Keras network itself would add Keras' own serving
    # endpoint); the signatures are the interface.
    root = tf.Module()
    root.net_variables = [v.value for v in net.variables]  # the tf.Variables under the Keras variables
    base = os.path.join(export_dir, name)
    os.makedirs(base, exist_ok=True)
    version = next_version(base)
    tmp = os.path.join(base, f".tmp-{version}-{os.getpid()}")
    tf.saved_model.save(root, tmp, signatures=signatures)
    metadata = {
        "name": name, "version": version, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "code_version": code_version(), "tensorflow_version": tf.__version__,
        "image": {"shape": list(sigs.image_shape), "dtype": "float32", "value_range": list(VALUE_RANGE),
                  "uint8": "round((images + 1) * 127.5)"},
        "num_classes": sigs.num_classes,
        "sampler": {"method": cfg.sampler, "grid": cfg.grid, "head": cfg.head, "default_steps": cfg.default_steps,
                    "default_nfe": solvers.nfe(cfg.sampler, cfg.default_steps)},
        "caps": {"max_images": cfg.max_images, "max_steps": cfg.max_steps, "max_guidance": cfg.max_guidance},
        "network": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(net.config).items()},
        "signatures": {k: _describe(fn) for k, fn in signatures.items()},
        **(info or {}),
    }
    os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
    if cfg.warmup:
        metadata["warmup"] = {"file": WARMUP_FILE, "signatures": write_warmup(os.path.join(tmp, WARMUP_FILE),
                                                                             sigs, name)}
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=1, sort_keys=True)
    path = os.path.join(base, str(version))
    try:
        os.rename(tmp, path)  # fails if another export took this version meanwhile: nothing is overwritten
    except OSError as e:
        raise ValueError(f"cannot move the export to {path} ({e.strerror}); it is left in {tmp}") from None
    return path


def export_run(run_dir, export_dir, name, cfg: ExportConfig, checkpoint=None):
    """Exports the EMA weights of a training run (`cud_tf.run_dir.load_run`); returns the version's path."""
    from cud_tf import run_dir as run_dir_lib

    check_name(name)
    cfg.validate(run_dir_lib.read_arch(run_dir)[0])  # before the (slower) restore
    run = run_dir_lib.load_run(run_dir, weights="ema", checkpoint=checkpoint)
    info = {"run": {"run_dir": os.path.abspath(run_dir), "checkpoint": run.checkpoint, "step": run.step,
                    "weights": "ema", "config": run.run_config}}
    return export(run.net, export_dir, name, cfg, info)

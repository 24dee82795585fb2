"""Our own training loop around `model.train_step` (`model.fit` fails under MultiWorkerMirroredStrategy in
Keras 3.15; docs/architecture.md): a tf.function around `strategy.run`, checkpoints with exact resume,
TensorBoard scalars and sample grids, a progress bar, and a clean stop on SIGTERM or Ctrl-C
(docs/distribution.md).

Only the chief writes the run directory; every worker takes part in each step and each checkpoint save."""
import dataclasses
import json
import os
import signal
import time
from typing import Callable, Optional

import keras
from absl import logging
import numpy as np
import tensorflow as tf

from cud_tf import checkpointing, execution, run_dir, sampling, solvers, summaries


class TrainingError(RuntimeError):
    """A one-line, user-facing reason why training stopped."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    run_dir: str
    train_steps: int
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    nonfinite: str = "skip"  # skip: drop the update and count it; stop: raise before anything is saved
    sample_nfes: tuple = (1, 2, 4, 8)
    sample_method: str = "euler"
    sample_head: int = 1
    num_sample_images: int = 10
    seed: int = 0
    progress: bool = True
    jit_recheck_minutes: float = 10.0  # --jit_compile unset: re-check the modes this often (0: never; execution)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """mirrored: all local GPUs, else the CPU; multiworker: from TF_CONFIG; tpu; default: no distribution."""
    if name == "mirrored":
        if not tf.config.list_physical_devices("GPU"):
            # On a CPU-only machine MirroredStrategy has one device and measured 2x slower here than no
            # strategy at all (25 vs 45 img/s, the same with OneDeviceStrategy): use the default strategy.
            logging.info("no GPU: --strategy=mirrored runs with the default strategy on the CPU")
            return tf.distribute.get_strategy()
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"unknown strategy {name!r}; expected mirrored, multiworker, tpu or default")


def setup_runtime(strategy_name: str, precision: str, global_batch_size: int) -> tf.distribute.Strategy:
    """What every trainer does before building networks: op determinism (exact resume), the Keras dtype policy,
    and the tf.distribute strategy, checked to split the global batch evenly. Returns the strategy."""
    if precision == "auto":
        raise ValueError("precision 'auto' is resolved before the runtime is set up: pass a Keras policy "
                         "(cud_tf.precision.choose_precision picks one; trainers.common.runtime does both)")
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(precision)
    strategy = make_strategy(strategy_name)
    if global_batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"--global_batch_size={global_batch_size} is not divisible by the "
                         f"{strategy.num_replicas_in_sync} replicas")
    return strategy


def _check_tf_config():
    """One clear line for a missing or malformed TF_CONFIG (the cluster of --strategy=multiworker)."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        logging.warning("TF_CONFIG is not set: --strategy=multiworker runs as a single worker")
        return
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"] + config["cluster"].get("chief", [])
        task = config["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not a valid cluster description ({type(e).__name__}: {e}); expected "
                         '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}} '
                         "(docs/distribution.md)") from None
    if not workers or task_type not in config["cluster"] or index >= len(config["cluster"][task_type]):
        raise ValueError(f"TF_CONFIG's task {task} is not in its cluster {config['cluster']} (docs/distribution.md)")


def is_chief(strategy) -> bool:
    """True on the one worker that writes summaries, samples and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs)


def sample_rows(net, image_shape, cfg: LoopConfig):
    """One row of generated images `[N, H, W, C]` per NFE of `cfg.sample_nfes`, from fixed noise."""
    z = tf.random.stateless_normal([cfg.num_sample_images, *image_shape], seed=[cfg.seed, 12345])
    labels = None
    if net.config.num_classes:
        labels = tf.range(cfg.num_sample_images) % net.config.num_classes
    # One trace for every row: the step count is a tensor, so the sampler runs as a while_loop.
    fn = tf.function(lambda z_, n_: sampling.generate(net, z_, n_, cfg.sample_method, cfg.sample_head, labels))
    rows = [fn(z, tf.constant(n)).numpy() for n in cfg.sample_nfes]
    return rows


class Interrupted(TrainingError):
    """Ctrl-C (SIGINT) stopped the run after saving a checkpoint; the trainer exits with status 130."""


class _StopFlag:
    """Set by SIGTERM or a first SIGINT; the loop saves at the next step boundary and returns (SIGTERM:
    preemption) or raises Interrupted (SIGINT). A second SIGINT quits at once (KeyboardInterrupt). Installed for
    the whole of `train`, so a signal during set-up (restore, tracing) also ends in a checkpoint, not a kill."""

    def __init__(self):
        self.stop, self.signal = False, None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.stop:
            raise KeyboardInterrupt
        self.stop, self.signal = True, self.signal or signum
        if signum == signal.SIGINT:
            try:  # a handler must not raise: stdout may be a pipe whose reader is gone (a killed parent process)
                print("\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to quit at once)", flush=True)
            except (OSError, ValueError):
                pass

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def checkpointed_variables(model):
    """The float variables that a checkpoint of `model` holds (nets, optimizer slots and EMA)."""
    out = []
    for item in model.trackables().values():
        objs = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else [item]
        for obj in objs:
            for v in getattr(obj, "variables", None) or [obj]:
                if tf.as_dtype(v.dtype).is_floating:
                    out.append(v)
    return out


def _nonfinite_count(variables) -> int:
    return int(sum(int(tf.reduce_any(~tf.math.is_finite(tf.convert_to_tensor(v)))) for v in variables))


def train(model, strategy, make_dist_dataset: Callable[[int], object], cfg: LoopConfig, arch: dict,
          image_shape, log: Optional[Callable[[str], None]] = print,
          on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Trains `model` to `cfg.train_steps`, resuming from the newest good checkpoint in `cfg.run_dir`.

    make_dist_dataset(start_step) -> a distributed dataset positioned at that step. Returns the last metrics.
    on_step(k), on every worker, with the number k of completed steps: once after the restore and after each step
    (after its checkpoint): host-side schedules such as DisBack's path recording and target switches.
    On SIGTERM or Ctrl-C (on any worker) every worker saves a checkpoint at the next step; SIGTERM then
    returns, Ctrl-C raises Interrupted. A non-finite
    update is skipped (`nonfinite="skip"`) or raises TrainingError (`"stop"`) before anything is saved; weights
    that are not finite are never saved (TrainingError).
    """
    log = log or logging.info
    with _StopFlag() as stop:
        chief = is_chief(strategy)
        if chief:
            os.makedirs(cfg.run_dir, exist_ok=True)
        run_dir.check_architecture(cfg.run_dir, arch)
        if chief and not os.path.exists(os.path.join(cfg.run_dir, run_dir.ARCH)):
            run_dir.write_json(os.path.join(cfg.run_dir, run_dir.ARCH), run_dir.to_json(arch))
        checkpoint = tf.train.Checkpoint(**model.trackables())
        ckpt = checkpointing.Checkpointer(checkpoint, cfg.run_dir, chief, cfg.keep_checkpoints, log)
        try:
            return _train_loop(model, strategy, make_dist_dataset, cfg, image_shape, log, chief, ckpt, stop,
                               on_step or (lambda k: None))
        except (checkpointing.CheckpointError, run_dir.RunError) as e:
            raise TrainingError(str(e)) from None
        finally:
            ckpt.close()


def _start_line(model, strategy, cfg, resumed):
    """One line: what trains where (strategy, devices, parameters, precision, XLA) and from where."""
    params = sum(int(tf.size(v)) for v in model.net.trainable_variables)
    if model.encoder is not None:
        params += sum(int(tf.size(v)) for v in model.encoder.trainable_variables)
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: TF's own placement on this host
        devices = [d.name for d in tf.config.list_logical_devices("GPU")][:1] or ["CPU:0"]
    where = f"resumed from {resumed} at step {int(model.step.numpy())}" if resumed else "a new run"
    return (f"training {cfg.run_dir}: {type(strategy).__name__} on {len(devices)} device(s) "
            f"({', '.join(d.split('device:')[-1] for d in devices)}), {params:,} parameters, "
            f"{keras.mixed_precision.global_policy().name}, XLA {'on' if model.xla else 'off'}; {where}; "
            f"to step {cfg.train_steps}")


def _choose_xla(model, strategy, dist_dataset, cfg, log, chief) -> dict:
    """Sets model.xla by measurement (or its cache), logs one line, records the choice in the run and returns it."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and sum(len(t) for t in resolver.cluster_spec().as_dict().values()) > 1:
        model.xla = False  # each worker would measure on its own: agree on graph mode unless told otherwise
        choice = dict(xla=False, source="multi-worker default")
    else:
        choice = execution.choose_xla(model, strategy, next(iter(dist_dataset)), log=log)
    if chief:
        timing = (f" (a step's losses and gradients: graph {choice['graph_s'] * 1e3:.0f} ms, XLA "
                  f"{choice['xla_s'] * 1e3:.0f} ms)") if "graph_s" in choice else ""
        log(f"--jit_compile unset: XLA {'on' if model.xla else 'off'}, {choice['source']}{timing}; pass "
            "--jit_compile or --nojit_compile to choose")
        run_dir.write_json(os.path.join(cfg.run_dir, "execution.json"), choice)
    return choice


def _rechecked(choice, check, step, cfg, log, chief):
    """Logs a finished re-check (`execution.Rechecks`), adds it to execution.json and, when it switched the mode,
    to the cache, so that the next run starts in the mode found faster last."""
    if not chief:
        return
    choice.setdefault("checks", []).append(dict(check, step=step))
    log(f"step {step}: re-checked graph mode against XLA on {check['rounds']} rounds of training steps (graph "
        f"{check['graph_s'] * 1e3:.0f} ms, XLA {check['xla_s'] * 1e3:.0f} ms a step): XLA "
        f"{'on' if check['xla'] else 'off'}{', switched' if check['switched'] else ''}")
    run_dir.write_json(os.path.join(cfg.run_dir, "execution.json"), choice)
    if check["switched"]:  # only a measured or cached choice is re-checked, and it carries its cache key
        execution.store(choice["key"], execution.measured_choice({False: check["graph_s"], True: check["xla_s"]},
                                                                 check["rounds"]), log=log)


def _train_loop(model, strategy, make_dist_dataset, cfg, image_shape, log, chief, ckpt, stop, on_step):
    resumed = ckpt.restore()
    start = int(model.step.numpy())
    checks, choice = None, None
    if model.xla is None:  # --jit_compile unset: graph mode or XLA, whichever is faster here (cud_tf.execution)
        choice = _choose_xla(model, strategy, make_dist_dataset(start), cfg, log, chief)
        checks = execution.Rechecks(choice, cfg.jit_recheck_minutes, period=sum(w for _, w in model.step_kinds()))
    if chief:
        log(_start_line(model, strategy, cfg, resumed))
    t_start = time.perf_counter()
    _check_workers_agree(strategy, model.step)
    on_step(start)
    iterator = iter(make_dist_dataset(start))

    @tf.function
    def train_step(it, preempted, xla):
        """One step; `xla` (a Python bool, equal to model.xla) keys one trace per mode."""
        del xla

        def replica_step(batch, preempted_):
            out = model.train_step(batch)
            out["preempted"] = tf.cast(preempted_, tf.float32)  # summed: > 0 when any worker got SIGTERM
            return out

        out = strategy.run(replica_step, args=(next(it), preempted))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    variables = checkpointed_variables(model)

    def save(step):
        if _nonfinite_count(variables):
            last = f"the last good checkpoint is {ckpt.latest}" if ckpt.latest else "no checkpoint yet"
            raise TrainingError(f"the weights are not finite at step {step}; nothing saved ({last}); lower "
                                "--learning_rate or set --grad_clip")
        ckpt.save(step)

    writer = tf.summary.create_file_writer(os.path.join(cfg.run_dir, "tb")) if chief else None
    config = run_dir.read_config(cfg.run_dir) if chief else {}
    if config and not resumed:
        summaries.write_config(writer, config)
    global_batch = model.global_batch_size
    progbar = keras.utils.Progbar(cfg.train_steps, stateful_metrics=["loss", "img/s"]) if (
        cfg.progress and chief) else None
    if progbar is not None and start:
        progbar.update(start)
    metrics, t_log, step_log = {}, time.perf_counter(), start
    step, last_saved = start, start if ckpt.latest else None
    while step < cfg.train_steps:
        if checks is not None:
            model.xla = checks.mode()
        t0 = time.perf_counter()
        out = train_step(iterator, tf.constant(stop.stop), bool(model.xla))
        metrics = {k: float(v) for k, v in out.items()}
        step += 1
        check = checks.record(model.xla, time.perf_counter() - t0) if checks is not None else None
        if check is not None:
            _rechecked(choice, check, step, cfg, log, chief)
        preempted = metrics.pop("preempted") > 0
        if metrics.get("nonfinite", 0.0) > 0 and cfg.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss or gradient at step {step} (update skipped, nothing saved); lower "
                f"--learning_rate, set --grad_clip, or pass --nonfinite=skip to skip such steps")
        if progbar is not None:
            progbar.update(step, [("loss", metrics["loss"])])
        if step % cfg.log_every == 0 or step == cfg.train_steps:
            now = time.perf_counter()
            metrics["images_per_sec"] = (step - step_log) * global_batch / max(now - t_log, 1e-9)
            t_log, step_log = now, step
            if writer is not None:
                summaries.write_scalars(writer, step, metrics)
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.train_steps and chief:
            write_samples(model, image_shape, cfg, writer, step, png=False)
        if step % cfg.checkpoint_every == 0 or preempted:
            save(step)
            last_saved = step
        if preempted:
            if writer is not None:
                writer.flush()
            resume = f"--flagfile={os.path.join(cfg.run_dir, run_dir.FLAGS_FILE)}"
            if stop.signal == signal.SIGINT:
                raise Interrupted(f"interrupted: saved checkpoint {ckpt.latest} at step {step}; resume with "
                                  f"the same command (or {resume})")
            log(f"SIGTERM: saved a checkpoint at step {step}; rerun the same command to resume")
            return metrics
        on_step(step)
    if last_saved != step:
        save(step)
    if chief:
        write_samples(model, image_shape, cfg, writer, step, png=True)
        writer.flush()
        seconds = time.perf_counter() - t_start
        log(f"done: step {step} in {seconds:.0f} s ({(step - start) * global_batch / max(seconds, 1e-9):.1f} img/s); "
            f"checkpoints, TensorBoard events (tb/) and samples.png in {cfg.run_dir}")
    return metrics


def _check_workers_agree(strategy, step):
    """Every worker must resume at the same step (they read the chief's checkpoints from shared storage)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or sum(len(tasks) for tasks in resolver.cluster_spec().as_dict().values()) <= 1:
        return

    @tf.function
    def moments():  # ReduceOp has SUM and MEAN only: equal steps <=> mean(s^2) == mean(s)^2
        def replica_fn():
            s = tf.cast(step, tf.float64)
            return tf.stack([s, s * s])

        return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(replica_fn), axis=None)

    mean, mean_sq = moments().numpy()
    if mean_sq != mean * mean:
        raise TrainingError(
            f"the workers resumed at different steps (mean {mean:g}, this one {int(step.numpy())}): give every "
            "worker the same --run_dir on storage that all of them can read (docs/distribution.md)")


def write_samples(model, image_shape, cfg: LoopConfig, writer, step, png):
    """Sample grid (one row per NFE) with the EMA weights: to TensorBoard, and to `samples.png` when asked."""
    model.sync_ema()
    rows = sample_rows(model.ema_net, image_shape, cfg)
    grid = summaries.sample_grid(rows, [solvers.nfe(cfg.sample_method, n) for n in cfg.sample_nfes])
    if writer is not None:
        with writer.as_default(step=step):
            tf.summary.image("samples_nfe_" + "_".join(map(str, cfg.sample_nfes)), grid[None], step=step)
    if png:
        png_bytes = tf.io.encode_png(grid).numpy()
        run_dir.write_atomically(os.path.join(cfg.run_dir, "samples.png"), lambda f: f.write(png_bytes), "wb")
        run_dir.write_atomically(os.path.join(cfg.run_dir, "samples.npy"), lambda f: np.save(f, np.stack(rows)),
                                 "wb")

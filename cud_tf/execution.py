"""Graph mode or XLA, chosen by measurement (`--jit_compile` unset): which runs a model's losses and gradients
faster depends on the network, the step and the machine (on one 2-core CPU XLA was 1.4x faster for the
quickstart network and 1.5x slower for the MNIST paper network; TRACT's step ran 20x slower under it).

`choose_xla` times a few steps of each after a warm-up, on the run's own first batch, and caches the choice per
network, objective, per-replica batch, device and TensorFlow version, so that later runs pay nothing. Timing
computes gradients only: no weight, optimizer slot or step changes, and the dropout RNG state is put back, so
the training that follows does not depend on the measurement (beyond XLA's own random stream).
"""
import hashlib
import json
import os
import platform
import time

import numpy as np
import tensorflow as tf

from cud_tf import run_dir


def cache_path():
    """$CUD_TF_CACHE/xla_choice.json (default ~/.cache/cud_tf)."""
    root = os.environ.get("CUD_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cud_tf")
    return os.path.join(root, "xla_choice.json")


def device_name() -> str:
    """The accelerator's name, or the CPU's model (and core count) on a machine without one."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{details.get('device_name', 'GPU')} x{len(gpus)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"


def cache_key(model, batch_shape) -> str:
    """sha256 of what decides the speed: networks, objective and its config, per-replica batch, device, TF."""
    parts = dict(network=run_dir.to_json(model.net.config), encoder=model.encoder is not None,
                 extra=sorted(model.extra_nets), objective=f"{model.objective.__module__}.{model.objective.__name__}",
                 config=run_dir.to_json(model.objective_cfg), batch=list(batch_shape), device=device_name(),
                 tensorflow=tf.__version__, precision=tf.keras.mixed_precision.global_policy().name)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _median_seconds(fn, steps, warmup):
    for _ in range(warmup):
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def choose_xla(model, strategy, dist_batch, steps: int = 3, warmup: int = 2, log=print) -> dict:
    """Sets `model.xla` to the faster mode for `model.objective` on `dist_batch` (one element of the run's
    distributed dataset) and returns {"xla", "source": "cache" | "measured", "graph_s", "xla_s", "key"}."""
    first = strategy.experimental_local_results(dist_batch)[0]
    batch_shape = tf.nest.flatten(first)[0].shape
    key = cache_key(model, batch_shape)
    path = cache_path()
    cache = run_dir.read_json(path, default={})
    if key in cache:
        model.xla = bool(cache[key]["xla"])
        return dict(cache[key], source="cache", key=key)
    state = [(v, tf.identity(v)) for v in model.non_trainable_variables]  # dropout RNG state among them
    seconds = {}
    for xla in (False, True):
        step_fn = model.objective_step(model.objective, xla=xla)

        @tf.function
        def losses_and_grads(batch, step_fn=step_fn):
            def replica(b):
                ctx = tf.distribute.get_replica_context()
                return step_fn(b, tf.constant(0, tf.int64), tf.cast(ctx.replica_id_in_sync_group, tf.int32),
                               ctx.num_replicas_in_sync)[0]
            return strategy.run(replica, args=(batch,))

        seconds[xla] = _median_seconds(lambda: losses_and_grads(dist_batch), steps, warmup)
    for v, value in state:
        v.assign(value)
    choice = dict(xla=seconds[True] < seconds[False], graph_s=seconds[False], xla_s=seconds[True],
                  device=device_name(), tensorflow=tf.__version__)
    model.xla = choice["xla"]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cache = run_dir.read_json(path, default={})  # another process may have added a key meanwhile
        cache[key] = choice
        run_dir.write_json(path, cache)
    except OSError as e:
        log(f"warning: cannot cache the XLA choice in {path} ({e.strerror or e}); the next run measures again")
    return dict(choice, source="measured", key=key)

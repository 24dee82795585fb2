"""Graph mode or XLA, chosen by measurement (`--jit_compile` unset): which runs a model's losses and gradients
faster depends on the network, the step and the machine (XLA was 1.2x faster for the quickstart network on one
2-core CPU without AVX-512, 1.3x slower on one with it, and 1.5x slower for the MNIST paper network).

`choose_xla` times a few steps of each after a warm-up, in alternation, on the run's own first batch (more
rounds while the two are too close to tell apart: `compare_modes`), and caches the choice per network, objective,
per-replica batch, device and TensorFlow version, so that later runs pay nothing. Timing computes gradients only:
no weight, optimizer slot or step changes, and the dropout RNG state is put back, so the training that follows
does not depend on the measurement, and both modes draw the same random numbers (interpolants.uniform).
`choose_sampler_xla` does the same for the evaluator's sampler (step kind "sample"): a one-step call of each
compiled sampler on the evaluation batch, cached per network, sampler, batch, device, precision and TF version.
"""
import hashlib
import json
import os
import platform
import time

import numpy as np
import tensorflow as tf

from cud_tf import run_dir


# Part of every choice's cache key (train steps, samplers), raised when the probe or the speed of what it times
# changes: version 1 timed graph mode on the metrics alone (the gradients pruned), so its choices leaned to graph
# mode; version 3: the network's GroupNorm became faster in graph mode, little under XLA (layers.GroupNorm);
# version 4: rounds until the pick is at most 5% slower (compare_modes), where 5-15 rounds could mis-pick by 9%.
PROBE_VERSION = 4


def cache_path(name="xla_choice.json"):
    """$CUD_TF_CACHE/<name> (default ~/.cache/cud_tf): the cache of measured choices."""
    root = os.environ.get("CUD_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cud_tf")
    return os.path.join(root, name)


def digest(parts: dict) -> str:
    """The cache key of a choice: sha256 (16 hex digits) of what decides the speed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached(key, name="xla_choice.json"):
    """The cached choice under `key` in cache file `name`, or None."""
    return run_dir.read_json(cache_path(name), default={}).get(key)


def store(key, choice: dict, name="xla_choice.json", log=print):
    """Adds `choice` under `key` to cache file `name`; a cache that cannot be written costs a warning only."""
    path = cache_path(name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cache = run_dir.read_json(path, default={})  # another process may have added a key meanwhile
        cache[key] = choice
        run_dir.write_json(path, cache)
    except OSError as e:
        log(f"warning: cannot cache the measured choice in {path} ({e.strerror or e}); the next run measures again")


def device_name() -> str:
    """The accelerator's name, or on a machine without one the CPU's model, core count and widest vector
    instructions (two CPUs of one model name, one with AVX-512 and one without, rank graph mode and XLA
    differently)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{details.get('device_name', 'GPU')} x{len(gpus)}"
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    vector = next((name for name in ("avx512f", "avx2", "avx") if name in flags), None)
    return f"{model} ({os.cpu_count()} cores{', ' + vector if vector else ''})"


def cache_key(model, batch_shape) -> str:
    """sha256 of what decides the speed: networks, objective and its config, per-replica batch, device, TF."""
    parts = dict(probe=PROBE_VERSION, network=run_dir.to_json(model.net.config), encoder=model.encoder is not None,
                 extra=sorted(model.extra_nets), objective=f"{model.objective.__module__}.{model.objective.__name__}",
                 config=run_dir.to_json(model.objective_cfg), batch=list(batch_shape), device=device_name(),
                 tensorflow=tf.__version__, precision=tf.keras.mixed_precision.global_policy().name)
    return digest(parts)


def fetch(result):
    """Waits for every tensor of `result` (a nest), as a caller that uses them would."""
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)


def interleaved_times(fns: dict, steps, warmup) -> dict:
    """{name: [wall seconds of fns[name]() in each of `steps` rounds]} (tensors fetched) after `warmup` rounds; a
    round calls every function once, in turn, so that a slow spell of a shared machine weighs on each alike
    (timing one after the other lets such a spell decide a choice), and every other round in reverse order, so
    that going first or after a given function favours none."""
    for _ in range(warmup):
        for fn in fns.values():
            fetch(fn())
    times = {name: [] for name in fns}
    for r in range(steps):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fetch(fns[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_seconds(fns: dict, steps, warmup) -> dict:
    """{name: median wall seconds of fns[name]()} over `steps` alternated rounds (`interleaved_times`)."""
    return {name: float(np.median(t)) for name, t in interleaved_times(fns, steps, warmup).items()}


def paired_log_ratio(numerator, denominator):
    """(mean, standard error) of log(numerator[i] / denominator[i]) over rounds i timed side by side (the standard
    error is inf for a single round)."""
    logs = np.log(np.asarray(numerator) / np.asarray(denominator))
    return float(np.mean(logs)), float(np.std(logs, ddof=1) / np.sqrt(len(logs))) if len(logs) > 1 else np.inf


# The probe's bar: the mode it picks may be at most this much slower than the other, at one-sided 95% confidence
# (Z). On a shared 2-core machine one call's time varies by ~10-15%, so five rounds cannot tell modes 5-10% apart:
# a 5-round probe picked the slower mode of DisBack's steps, 9% apart, once in three. More rounds cannot help where
# the ranking itself moves with the machine's load (docs/speed.md, "The probe when graph mode and XLA are close").
TOLERANCE, Z = 0.05, 1.645


def decide(rounds):
    """({xla: median seconds}, settled) from rounds [{False: graph seconds, True: XLA seconds}] timed side by side:
    settled when the faster median is at most TOLERANCE slower than the other mode, as the mean of the rounds'
    paired log(XLA / graph) plus Z standard errors says (at once when the modes are far apart, after more rounds
    in a near-tie)."""
    seconds = {xla: float(np.median([r[xla] for r in rounds])) for xla in (False, True)}
    mean, se = paired_log_ratio([r[True] for r in rounds], [r[False] for r in rounds])  # mean > 0: XLA slower
    risk = mean if seconds[True] < seconds[False] else -mean  # log of how much slower the pick may be
    return seconds, bool(risk + Z * se < np.log1p(TOLERANCE))


def compare_modes(fns: dict, steps, warmup, per_mode, max_rounds=None):
    """({xla: median seconds}, rounds): alternated rounds of `fns` (`interleaved_times`), each reduced to {xla:
    seconds} by `per_mode`, `steps` rounds at a time until `decide` says the faster is known well enough, or
    `max_rounds` (default 6 * steps) are spent."""
    max_rounds = max_rounds or 6 * steps
    rounds = []
    while True:
        # A block after an odd number of rounds starts in reverse, so the order keeps alternating across blocks.
        order = fns if len(rounds) % 2 == 0 else dict(reversed(fns.items()))
        times = interleaved_times(order, steps, warmup if not rounds else 0)
        rounds += [per_mode({name: t[i] for name, t in times.items()}) for i in range(steps)]
        seconds, settled = decide(rounds)
        if settled or len(rounds) >= max_rounds:
            return seconds, len(rounds)


def measured_choice(seconds, rounds):
    """The cached record of a measurement {xla: seconds}: the faster mode, both timings, rounds, device and TF."""
    return dict(xla=seconds[True] < seconds[False], graph_s=seconds[False], xla_s=seconds[True], rounds=rounds,
                device=device_name(), tensorflow=tf.__version__)


def choose_xla(model, strategy, dist_batch, steps: int = 5, warmup: int = 2, log=print) -> dict:
    """Sets `model.xla` to the faster mode for the model's steps (`model.step_kinds()`, weighted by how often each
    runs) on `dist_batch` (one element of the run's distributed dataset) and returns {"xla", "source": "cache" |
    "measured", "graph_s", "xla_s", "key"}."""
    first = strategy.experimental_local_results(dist_batch)[0]
    batch_shape = tf.nest.flatten(first)[0].shape
    key = cache_key(model, batch_shape)
    hit = cached(key)
    if hit is not None:
        model.xla = bool(hit["xla"])
        return dict(hit, source="cache", key=key)
    state = [(v, tf.identity(v)) for v in model.non_trainable_variables]  # dropout RNG state among them

    def losses_and_grads(objective, xla):
        step_fn = model.objective_step(objective, xla=xla)

        @tf.function
        def run(batch, step):
            def replica(b):
                ctx = tf.distribute.get_replica_context()
                return step_fn(b, step, tf.cast(ctx.replica_id_in_sync_group, tf.int32), ctx.num_replicas_in_sync)
            return strategy.run(replica, args=(batch,))
        # Metrics and gradients are both fetched and the step is an input, as in training: graph mode would prune
        # the gradients of a function that returns the metrics alone, and fold the draws made from a constant step
        # (seeds, noise, times) into constants, while an XLA computation computes all of its outputs from inputs.
        step = tf.constant(0, tf.int64)
        return lambda: run(dist_batch, step)

    kinds = model.step_kinds()  # a step's time: the weighted mean over the kinds of step the model takes
    seconds, rounds = compare_modes(
        {(xla, k): losses_and_grads(objective, xla) for xla in (False, True) for k, (objective, _) in enumerate(kinds)},
        steps, warmup, lambda times: {xla: sum(w * times[xla, k] for k, (_, w) in enumerate(kinds))
                                      / sum(w for _, w in kinds) for xla in (False, True)})
    for v, value in state:
        v.assign(value)
    choice = measured_choice(seconds, rounds)
    model.xla = choice["xla"]
    store(key, choice, log=log)
    return dict(choice, source="measured", key=key)


def choose_sampler_xla(make_sampler, args, net, sampler: str, extra=None, steps: int = 3, warmup: int = 1,
                       log=print):
    """Graph mode or XLA for a sampler, by measurement or its cache (step kind "sample").

    make_sampler(jit_compile: bool) -> a tf.function `f(*args)`; args: one call's arguments, e.g. (noise
    `[B, H, W, C]`, a step count of 1, labels `[B]`); net: the VelocityUNet it samples; extra: other facts that
    decide the speed (guidance, head). Returns (the faster tf.function, {"xla", "source": "cache" | "measured",
    "graph_s", "xla_s", "key"}). Only the chosen function is built on a cache hit."""
    batch_shape = tf.nest.flatten(args)[0].shape
    parts = dict(kind="sample", probe=PROBE_VERSION, network=run_dir.to_json(net.config), sampler=sampler,
                 extra=run_dir.to_json(extra), batch=list(batch_shape), device=device_name(), tensorflow=tf.__version__,
                 precision=tf.keras.mixed_precision.global_policy().name)
    key = digest(parts)
    hit = cached(key)
    if hit is not None:
        return make_sampler(bool(hit["xla"])), dict(hit, source="cache", key=key)
    fns = {xla: make_sampler(xla) for xla in (False, True)}
    seconds, rounds = compare_modes({xla: lambda fn=fn: fn(*args) for xla, fn in fns.items()}, steps, warmup, dict)
    choice = measured_choice(seconds, rounds)
    store(key, choice, log=log)
    return fns[choice["xla"]], dict(choice, source="measured", key=key)


# Re-checks during training (`--jit_recheck_minutes`): only while the modes are this close (the load of a shared
# machine moved them by ~10% either way; gaps of 1.3x and more kept their order in every measurement here), at most
# this many rounds per check (a tie that many rounds cannot settle costs little whichever mode runs), and at least
# this many steps after the last check.
NEAR, RECHECK_ROUNDS, RECHECK_MIN_STEPS = 0.25, 10, 100


def near(graph_s, xla_s) -> bool:
    """Whether the two modes' step times are within NEAR of each other."""
    return max(graph_s, xla_s) < (1.0 + NEAR) * min(graph_s, xla_s)


class Rechecks:
    """Graph mode against XLA again during training, every `minutes`, on the run's own training steps.

    Where two modes are close, their ranking moves with a shared machine's load (docs/speed.md), so the probe's one
    measurement at the start can leave a long run in the slower mode. A check runs `period` warm-up steps of the
    other mode, then rounds of `period` steps in each mode (one cycle of the model's step kinds; which mode goes
    first alternates), `steps` rounds at a time, until `decide` settles or RECHECK_ROUNDS rounds are spent; a
    settled check runs the faster mode from then on, an unsettled one keeps the mode. A check's steps are real
    training steps with the same random numbers in either mode (interpolants.uniform), so a check costs only the
    other mode's extra time. Checks stop for good once one finds the modes more than NEAR apart.

    The loop asks `mode()` before each step and reports `record(xla, seconds)` after it; `record` returns a
    finished check {"graph_s", "xla_s" (seconds per step), "rounds", "settled", "xla", "switched"}, else None.
    """

    def __init__(self, choice: dict, minutes: float, period: int = 1, steps: int = 5, clock=time.perf_counter):
        self.xla, self.period, self.steps, self.clock = bool(choice["xla"]), period, steps, clock
        self.interval = minutes * 60.0
        self.active = minutes > 0 and "graph_s" in choice and near(choice["graph_s"], choice["xla_s"])
        self._since, self._steps_since = clock(), 0
        self._plan, self._rounds = [], []  # plan: [(xla, round index or None for warm-up)], one entry per step

    def mode(self) -> bool:
        """The mode of the next step (True: XLA); starts a check when one is due."""
        if (not self._plan and self.active and self._steps_since >= RECHECK_MIN_STEPS
                and self.clock() - self._since >= self.interval):
            self._plan = [(not self.xla, None)] * self.period
            self._plan_rounds()
        return self._plan[0][0] if self._plan else self.xla

    def _plan_rounds(self):
        for r in range(len(self._rounds), len(self._rounds) + self.steps):
            self._rounds.append({False: 0.0, True: 0.0})
            first = self.xla if r % 2 == 0 else not self.xla
            self._plan += [(first, r)] * self.period + [(not first, r)] * self.period

    def record(self, xla: bool, seconds: float):
        """Reports a step's wall seconds in mode `xla`; returns a finished check's record, else None."""
        if not self._plan:
            self._steps_since += 1
            return None
        planned, r = self._plan.pop(0)
        if planned != xla:
            raise ValueError(f"a step ran with XLA {'on' if xla else 'off'} while the check planned the other mode")
        if r is not None:
            self._rounds[r][xla] += seconds / self.period
        if self._plan:
            return None
        seconds_, settled = decide(self._rounds)
        if not settled and len(self._rounds) < RECHECK_ROUNDS:
            self._plan_rounds()
            return None
        previous = self.xla
        if settled:
            self.xla = seconds_[True] < seconds_[False]
        self.active = near(seconds_[False], seconds_[True])
        check = dict(graph_s=seconds_[False], xla_s=seconds_[True], rounds=len(self._rounds), settled=settled,
                     xla=self.xla, switched=self.xla != previous)
        self._since, self._steps_since, self._rounds = self.clock(), 0, []
        return check

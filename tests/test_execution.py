"""The evaluator's sampler runs in graph mode or under XLA by measurement (--jit_compile unset), cached and
recorded in the result; an explicit --jit_compile / --nojit_compile wins without timing anything."""
import json

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import parse, tiny_unet_config
from cud_tf import evaluation, execution
from cud_tf import run_dir as run_dir_lib
from cud_tf.metrics import frechet
from cud_tf.networks.unet import VelocityUNet
from trainers import evaluate

FLAGS = flags.FLAGS
evaluate.define_flags()


class MeanFeatures:
    """A 2-d stand-in metric: per-image mean and standard deviation, against a standard reference."""

    name, dim = "stub distance", 2
    reference = frechet.Gaussian(np.zeros(2), np.eye(2), 100)

    def features(self, x):
        return tf.stack([tf.reduce_mean(x, [1, 2, 3]), tf.math.reduce_std(x, [1, 2, 3])], axis=1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tf.keras.utils.set_random_seed(0)
    cfg = tiny_unet_config()
    net = VelocityUNet(cfg).build_variables()
    return run_dir_lib.LoadedRun(run_dir=str(tmp_path_factory.mktemp("sample")), net=net, config=cfg, run_config={},
                                 step=0, checkpoint="none")


def sample(loaded, jit_compile, lines):
    cfg = evaluation.EvalConfig(nfes=(1, 2), num_samples=6, batch_size=4, num_grid_images=2, jit_compile=jit_compile)
    return evaluation.sample_and_score(loaded, cfg, MeanFeatures(), log=lines.append)[0]


@pytest.fixture
def no_sampling(monkeypatch, tmp_path):
    """A private cache, and scoring that never runs the sampler (an XLA compilation of it takes a minute on 2
    busy cores; the sampling itself is covered by test_evaluate)."""
    monkeypatch.setenv("CUD_TF_CACHE", str(tmp_path))
    monkeypatch.setattr(evaluation, "score", lambda *a, **k: (1.0, None, np.zeros([2, 8, 8, 1], np.float32)))


def timings(monkeypatch, *seconds):
    """Stands in for the timer: graph mode, then XLA, take `seconds` (two per measurement); records the functions it
    was given."""
    given = []

    def fake(fns, steps, warmup):
        assert list(fns) == [False, True]  # {xla: fn}, timed side by side
        given.extend(fns.values())
        return {xla: [s] * steps for xla, s in zip(fns, seconds[len(given) - 2:len(given)])}

    monkeypatch.setattr(execution, "interleaved_times", fake)
    return given


@pytest.mark.parametrize("graph_s,xla_s", [(2.0, 1.0), (1.0, 2.0)])
def test_unset_jit_compile_is_measured_once_then_read_from_the_cache(loaded, no_sampling, monkeypatch, graph_s,
                                                                     xla_s):
    timed = timings(monkeypatch, graph_s, xla_s)
    lines = []
    result = sample(loaded, None, lines)
    choice = result["jit_compile"]
    assert len(timed) == 2 and choice["source"] == "measured" and choice["xla"] == (xla_s < graph_s)
    assert (choice["graph_s"], choice["xla_s"]) == (graph_s, xla_s)
    assert json.loads(json.dumps(result))["jit_compile"]["xla"] == choice["xla"]  # recorded in the JSON
    assert list(json.load(open(execution.cache_path()))) == [choice["key"]]
    assert [line for line in lines if line.startswith("--jit_compile unset: sampler XLA ")] == [
        f"--jit_compile unset: sampler XLA {'on' if xla_s < graph_s else 'off'}, measured (one sampler step of 4 "
        f"images: graph {graph_s * 1e3:.0f} ms, XLA {xla_s * 1e3:.0f} ms); pass --jit_compile or --nojit_compile "
        "to choose"]

    monkeypatch.setattr(execution, "interleaved_times", lambda *a: pytest.fail("measured again"))
    again = sample(loaded, None, [])
    assert again["jit_compile"]["source"] == "cache" and again["jit_compile"]["xla"] == choice["xla"]
    assert again["jit_compile"]["key"] == choice["key"]


def test_the_sample_step_kind_has_its_own_key(loaded, no_sampling, monkeypatch):
    """Another sampler or batch is measured again (it runs another computation)."""
    timed = timings(monkeypatch, 1.0, 2.0, 1.0, 2.0)
    first = sample(loaded, None, [])["jit_compile"]
    cfg = evaluation.EvalConfig(nfes=(2,), num_samples=6, batch_size=4, sampler="heun", jit_compile=None)
    second = evaluation.sample_and_score(loaded, cfg, MeanFeatures(), log=lambda _: None)[0]["jit_compile"]
    assert len(timed) == 4 and second["source"] == "measured" and second["key"] != first["key"]


@pytest.mark.parametrize("jit", [False, True])
def test_an_explicit_jit_compile_wins_over_the_cache_without_timing(loaded, no_sampling, monkeypatch, jit):
    timings(monkeypatch, 2.0, 1.0) if not jit else timings(monkeypatch, 1.0, 2.0)
    assert sample(loaded, None, [])["jit_compile"]["xla"] == (not jit)  # the cache now says the opposite
    monkeypatch.setattr(execution, "interleaved_times", lambda *a: pytest.fail("timed despite the flag"))
    lines = []
    result = sample(loaded, jit, lines)
    assert result["jit_compile"] == dict(xla=jit, source="flag")
    assert not any("--jit_compile unset" in line for line in lines)


def test_the_sampler_choice_times_both_compiled_samplers(loaded, tmp_path, monkeypatch):
    """The real timer on a graph-mode-only stand-in: both functions are built, called, and the faster kept."""
    monkeypatch.setenv("CUD_TF_CACHE", str(tmp_path))
    built = []

    def make(jit):
        built.append(jit)
        return tf.function(lambda z: z * (2.0 if jit else 1.0))

    fn, choice = execution.choose_sampler_xla(make, (tf.ones([2, 8, 8, 1]),), loaded.net, "euler", steps=1)
    assert built == [False, True] and choice["source"] == "measured"
    assert float(fn(tf.ones([2, 8, 8, 1]))[0, 0, 0, 0]) == (2.0 if choice["xla"] else 1.0)
    fn, cached = execution.choose_sampler_xla(make, (tf.ones([2, 8, 8, 1]),), loaded.net, "euler")
    assert cached["source"] == "cache" and built == [False, True, choice["xla"]]


def test_evaluate_flag_defaults_to_measured():
    with flagsaver.flagsaver():
        parse("--run_dir=r", prog="trainers.evaluate")
        assert FLAGS.jit_compile is None and evaluate.eval_config().jit_compile is None
        parse("--run_dir=r", "--nojit_compile", prog="trainers.evaluate")
        assert evaluate.eval_config().jit_compile is False


def test_candidates_are_timed_in_alternation():
    """A slow spell of a shared machine must weigh on every candidate alike: rounds of one call each, in turn,
    every other round in reverse (no candidate always goes first)."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or tf.constant(0.0)) for name in ("graph", "xla")}
    seconds = execution.interleaved_seconds(fns, steps=3, warmup=1)
    assert calls == ["graph", "xla"] * 2 + ["xla", "graph"] + ["graph", "xla"] and list(seconds) == ["graph", "xla"]
    assert all(s >= 0 for s in seconds.values())


GRAPH = [1.0] * 5
NOISY_TIE = [0.8, 1.2, 0.9, 1.1, 0.97]  # XLA's rounds: median 3% faster, but one call varies by 20%


@pytest.mark.parametrize("xla_looks,rounds,xla_median", [
    ([[2.0, 1.9, 2.1, 2.0, 2.0]], 5, 2.0),  # 2x apart: the first look decides
    ([NOISY_TIE, [0.97] * 5], 10, 0.97),  # too noisy to say the pick is within 5%, until a second look
    ([[0.8, 1.25, 0.8, 1.25, 1.0]] * 6, 30, 1.0),  # never decided: stops at 6 * steps rounds
])
def test_modes_too_close_to_tell_apart_get_more_rounds(monkeypatch, xla_looks, rounds, xla_median):
    """More alternated rounds until the faster median is at most 5% slower than the other mode at 95% confidence
    (the paired per-round log-ratios' mean + 1.645 standard errors)."""
    looks, orders = [], []

    def fake(fns, steps, warmup):
        looks.append(warmup)
        orders.append(list(fns))
        return {False: GRAPH[:steps], True: xla_looks[len(looks) - 1][:steps]}

    monkeypatch.setattr(execution, "interleaved_times", fake)
    seconds, n = execution.compare_modes({False: None, True: None}, 5, 2, dict)
    assert looks == [2] + [0] * (len(xla_looks) - 1) and n == rounds
    # Blocks of 5 rounds: every other block starts in reverse, so the order alternates across blocks too.
    assert orders == [[False, True] if i % 2 == 0 else [True, False] for i in range(len(xla_looks))]
    assert seconds == pytest.approx({False: 1.0, True: xla_median})


def test_the_probe_weighs_each_round_before_comparing_modes(monkeypatch):
    """per_mode reduces each round's {name: seconds} (e.g. several step kinds) to {xla: seconds} before the rounds
    are compared."""
    times = {(False, 0): [1.0, 1.0], (False, 1): [3.0, 3.0], (True, 0): [2.0, 2.0], (True, 1): [1.0, 1.0]}
    monkeypatch.setattr(execution, "interleaved_times", lambda fns, steps, warmup: times)
    per_mode = lambda t: {xla: t[xla, 0] + t[xla, 1] for xla in (False, True)}  # noqa: E731
    assert execution.compare_modes(dict.fromkeys(times), 2, 0, per_mode) == ({False: 4.0, True: 3.0}, 2)


def test_a_cpu_device_name_tells_avx512_from_avx2():
    """Choices are cached per device: two CPUs of one model name with and without AVX-512 must not share them."""
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("names a GPU")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    name = execution.device_name()
    assert name.endswith(", avx512f)") == ("avx512f" in flags)
    assert name.endswith(", avx2)") == ("avx2" in flags and "avx512f" not in flags)


class Clock:
    """A stand-in clock that the simulated steps advance."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate(checks, clock, step_seconds, steps):
    """Runs `steps` steps through `checks` (mode, then record); step_seconds(xla, i) -> seconds. Returns the modes
    run and the finished checks, with their step numbers."""
    modes, finished = [], []
    for i in range(steps):
        xla = checks.mode()
        seconds = step_seconds(xla, i)
        clock.now += seconds
        modes.append(xla)
        check = checks.record(xla, seconds)
        if check is not None:
            finished.append(dict(check, step=i + 1))
    return modes, finished


NEAR_TIE = dict(xla=False, graph_s=1.0, xla_s=1.1)


def test_a_recheck_switches_to_the_mode_that_became_faster():
    """Graph mode won the probe by 10%; then the machine's load slows it to 1.3 s a step while XLA takes 1.1 s. No
    check before `minutes` and RECHECK_MIN_STEPS steps; then one warm-up step of XLA, and rounds of one step in each
    mode, first graph then XLA, then reversed; a 2-round-sure gap settles after the first block of 5 rounds."""
    clock = Clock()
    checks = execution.Rechecks(NEAR_TIE, minutes=2.0, clock=clock)
    modes, finished = simulate(checks, clock, lambda xla, i: 1.1 if xla else 1.3, 200)
    start = execution.RECHECK_MIN_STEPS  # 100 steps of 1.3 s: past the 2 minutes too
    assert modes[:start] == [False] * start
    rounds = [[False, True] if r % 2 == 0 else [True, False] for r in range(5)]
    assert modes[start:start + 11] == [True] + [m for pair in rounds for m in pair]
    assert finished == [dict(graph_s=pytest.approx(1.3), xla_s=pytest.approx(1.1), rounds=5, settled=True, xla=True,
                             switched=True, step=start + 11)]
    assert modes[start + 11:] == [True] * (200 - start - 11)
    assert checks.active  # 18% apart: still close enough to check again later


def test_rechecks_keep_the_mode_in_an_unsettled_tie_and_stop_when_the_modes_are_far_apart():
    """An even tie whose XLA steps vary by 50% stays unsettled for RECHECK_ROUNDS rounds: the mode is kept. A check
    that finds the modes 3x apart, or a probe that did, or no probe timings, or minutes=0: no (more) checks."""
    clock = Clock()
    checks = execution.Rechecks(NEAR_TIE, minutes=1.0, clock=clock)
    xla_calls = []
    noisy = lambda xla, i: (1.25 if xla_calls.append(i) or len(xla_calls) % 2 else 0.8) if xla else 1.0  # noqa: E731
    modes, finished = simulate(checks, clock, noisy, 100 + 1 + 2 * execution.RECHECK_ROUNDS + 5)
    assert [(c["rounds"], c["settled"], c["xla"], c["switched"]) for c in finished] == [
        (execution.RECHECK_ROUNDS, False, False, False)]
    assert checks.active and modes[-5:] == [False] * 5

    clock = Clock()
    checks = execution.Rechecks(NEAR_TIE, minutes=1.0, clock=clock)
    _, finished = simulate(checks, clock, lambda xla, i: 3.0 if xla else 1.0, 300)
    assert len(finished) == 1 and finished[0]["xla"] is False and not checks.active  # 3x apart: no more checks
    far = execution.Rechecks(dict(xla=True, graph_s=2.0, xla_s=1.0), minutes=1.0, clock=Clock())
    assert not far.active  # the probe found them 2x apart: never checked
    assert not execution.Rechecks(dict(xla=False, source="multi-worker default"), minutes=1.0).active
    assert not execution.Rechecks(NEAR_TIE, minutes=0.0).active


def test_a_recheck_round_spans_a_cycle_of_step_kinds():
    """period 2 (e.g. DisBack's generator step, then a fake-only step): warm-up and each mode's part of a round are
    two steps, so every part holds one step of each kind; a round's time is per step."""
    clock = Clock()
    checks = execution.Rechecks(NEAR_TIE, minutes=0.0001, period=2, clock=clock)
    cost = lambda xla, i: (2.0 if i % 2 == 0 else 1.0) * (0.5 if xla else 1.0)  # noqa: E731
    modes, finished = simulate(checks, clock, cost, 100 + 2 + 20)
    assert modes[100:108] == [True, True, False, False, True, True, True, True]
    assert finished[0]["graph_s"] == pytest.approx(1.5) and finished[0]["xla_s"] == pytest.approx(0.75)


def test_a_step_in_another_mode_than_the_check_planned_is_an_error():
    clock = Clock()
    checks = execution.Rechecks(NEAR_TIE, minutes=0.0001, clock=clock)
    simulate(checks, clock, lambda xla, i: 1.0, execution.RECHECK_MIN_STEPS)
    assert checks.mode() is True  # the check's warm-up step of the other mode
    with pytest.raises(ValueError, match="planned the other mode"):
        checks.record(False, 1.0)

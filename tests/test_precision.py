"""--precision=auto: bf16 only on bf16 hardware and when a timed forward + backward pass finds it faster; cached;
resolved before the run is recorded, so a resumed run keeps its policy. mixed_bfloat16 trains on float32 master
weights, EMA, losses, targets and random draws."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import parse, tiny_unet_config
from cud_tf import execution, interpolants, precision
from cud_tf import run_dir as run_dir_lib
from cud_tf.models.base import OptimConfig, ema_variables
from cud_tf.models.cud import CudModel
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import OBJECTIVES, ObjectiveConfig
from cud_tf.objectives import cud as cud_objective
from trainers import common
from trainers import cud as cud_trainer

FLAGS = flags.FLAGS
cud_trainer.define_flags()

EPYC = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx2\n")
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
NO_BF16 = "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n"
BF16_HW = dict(bf16=True, device="test CPU (2 cores)", flags="avx512_bf16")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CUD_TF_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("text,expected", [(EPYC, ["avx512_bf16"]), (SAPPHIRE_RAPIDS, ["amx_bf16", "avx512_bf16"]),
                                           (NO_BF16, []), ("", []), ("model name : x\n", [])])
def test_bf16_instructions_are_read_from_the_cpu_flags(text, expected):
    assert precision.bf16_cpu_flags(text) == expected


def test_without_bf16_hardware_auto_is_float32_without_timing(monkeypatch):
    monkeypatch.setattr(precision, "forward_backward_seconds", lambda *a: pytest.fail("timed without bf16"))
    hw = dict(bf16=False, device="old CPU", flags="no bf16 instructions")
    choice = precision.choose_precision(tiny_unet_config(), [8, 8, 8, 1], hardware=hw)
    assert choice["precision"] == "float32" and choice["source"] == "no bf16 hardware"


@pytest.mark.parametrize("f32_s,bf16_s,expected", [(2.0, 1.0, "mixed_bfloat16"), (1.0, 1.5, "float32")])
def test_bf16_hardware_takes_the_faster_policy_once_then_the_cache(monkeypatch, f32_s, bf16_s, expected):
    timed = []

    def fake(net_cfg, batch_shape, policies, steps, warmup):
        timed.extend(policies)
        return {p: {"float32": f32_s, "mixed_bfloat16": bf16_s}[p] for p in policies}

    monkeypatch.setattr(precision, "forward_backward_seconds", fake)
    cfg = tiny_unet_config()
    choice = precision.choose_precision(cfg, [8, 8, 8, 1], hardware=BF16_HW)
    assert timed == ["float32", "mixed_bfloat16"] and choice["precision"] == expected
    assert choice["source"] == "measured" and (choice["float32_s"], choice["mixed_bfloat16_s"]) == (f32_s, bf16_s)
    assert list(json.load(open(execution.cache_path(precision.CACHE)))) == [choice["key"]]
    assert precision.describe(choice).startswith(f"--precision=auto: {expected}, measured (forward + backward")

    monkeypatch.setattr(precision, "forward_backward_seconds", lambda *a: pytest.fail("timed again"))
    cached = precision.choose_precision(cfg, [8, 8, 8, 1], hardware=BF16_HW)
    assert cached["source"] == "cache" and cached["precision"] == expected and cached["key"] == choice["key"]
    # Another batch or network runs another computation: measured again.
    monkeypatch.setattr(precision, "forward_backward_seconds", fake)
    assert precision.choose_precision(cfg, [4, 8, 8, 1], hardware=BF16_HW)["source"] == "measured"


def test_forward_backward_timing_runs_under_its_policy_and_restores_the_global_one(monkeypatch):
    before = keras.mixed_precision.global_policy().name
    policies = []
    real_build = VelocityUNet.build_variables

    def build(self):
        policies.append(self.conv_in.dtype_policy.name)
        return real_build(self)

    monkeypatch.setattr(VelocityUNet, "build_variables", build)
    seconds = precision.forward_backward_seconds(tiny_unet_config(), [2, 8, 8, 1], ("float32", "mixed_bfloat16"),
                                                 steps=1, warmup=0)
    assert list(seconds) == ["float32", "mixed_bfloat16"] and min(seconds.values()) > 0
    assert policies == ["float32", "mixed_bfloat16"] and keras.mixed_precision.global_policy().name == before
    # Traced under its policy: the bf16 step's convolutions run in bf16 though the global policy is not bf16 now.
    def conv_dtypes(policy):
        step = precision.forward_backward_step(tiny_unet_config(), [2, 8, 8, 1], policy)
        return {op.get_attr("T") for op in step.get_concrete_function().graph.get_operations() if op.type == "Conv2D"}

    assert tf.bfloat16 in conv_dtypes("mixed_bfloat16") and conv_dtypes("float32") == {tf.float32}


def test_this_machine_has_bf16_or_not_by_its_own_flags():
    hw = precision.bf16_hardware()
    if tf.config.list_physical_devices("GPU"):
        assert hw["flags"].startswith("compute capability ")
    else:
        with open("/proc/cpuinfo") as f:
            assert hw["bf16"] == bool(precision.bf16_cpu_flags(f.read()))


# -- The trainers: resolved before the run is recorded; a resumed run keeps its recorded policy. --

def test_auto_is_resolved_into_flags_and_the_policy(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(precision, "choose_precision",
                        lambda *a, **k: dict(precision="mixed_bfloat16", source="measured", float32_s=2.0,
                                             mixed_bfloat16_s=1.0, hardware=BF16_HW))
    lines = []
    with precision.global_policy():  # runtime() sets the process-wide policy: restored afterwards
        with flagsaver.flagsaver():
            parse(f"--run_dir={run_dir}", "--strategy=default")
            assert FLAGS.precision == "auto"  # the default
            common.runtime(tiny_unet_config(), log=lines.append)
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            assert FLAGS.precision == "mixed_bfloat16" and "--precision=mixed_bfloat16\n" in common.flags_string()
            assert common.recorded_config("cud", tiny_unet_config())["precision"] == "mixed_bfloat16"
    assert lines == ["--precision=auto: mixed_bfloat16, measured (forward + backward: float32 2000 ms, "
                     "mixed_bfloat16 1000 ms); test CPU (2 cores): avx512_bf16; pass --precision to choose"]


def write_flags(run_dir, text):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, run_dir_lib.FLAGS_FILE), "w") as f:
        f.write(text)


def open_run(run_dir):
    run_dir_lib.open_run(run_dir, arch={"a": 1}, config={"c": 1}, flags_text=common.flags_string(),
                         definitions=FLAGS, names=common.DEFINED, mutable=common.MUTABLE)


@pytest.mark.parametrize("recorded", ["mixed_bfloat16", "float32"])
def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch, recorded):
    run_dir = str(tmp_path / "run")
    write_flags(run_dir, f"--run_dir={run_dir}\n--precision={recorded}\n")
    monkeypatch.setattr(precision, "choose_precision", lambda *a, **k: pytest.fail("measured on a resume"))
    lines = []
    with flagsaver.flagsaver():
        parse(f"--run_dir={run_dir}")
        assert common.resolve_precision(tiny_unet_config(), 1, log=lines.append) == recorded
        assert FLAGS.precision == recorded
        open_run(run_dir)  # the resume's flags equal the recorded ones
    assert lines == [f"--precision=auto: {recorded}, recorded in {run_dir} (a resumed run keeps the policy it "
                     "started with)"]


def test_a_resume_with_another_explicit_precision_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    write_flags(run_dir, f"--run_dir={run_dir}\n--precision=mixed_bfloat16\n")
    with flagsaver.flagsaver():
        parse(f"--run_dir={run_dir}", "--precision=float32")
        assert common.resolve_precision(tiny_unet_config(), 1) == "float32"  # explicit: not replaced
        with pytest.raises(run_dir_lib.RunError, match="--precision: mixed_bfloat16 recorded vs float32 now"):
            open_run(run_dir)


def test_multiple_workers_agree_on_float32_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "choose_precision", lambda *a, **k: pytest.fail("a worker measured"))
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with flagsaver.flagsaver():
        parse("--run_dir=r", "--strategy=multiworker")
        assert common.resolve_precision(tiny_unet_config(), 2, log=lambda _: None) == "float32"


def test_bad_precision_is_refused_in_one_line():
    with flagsaver.flagsaver(), pytest.raises(flags.IllegalFlagValueError, match=r"<auto\|float32\|mixed_bfloat16"):
        parse("--precision=bf16")


# -- mixed_bfloat16 done right: bf16 activations, float32 everything that accumulates or is drawn. --

@pytest.fixture
def bf16_policy():
    with precision.global_policy("mixed_bfloat16"):
        yield


def test_mixed_bfloat16_step_keeps_weights_ema_losses_targets_and_draws_float32(bf16_policy, monkeypatch):
    seen = {"draws": [], "targets": [], "per_example": [], "metrics": []}

    class RecordingRng(interpolants.Rng):
        def uniform(self, *a, **k):
            out = super().uniform(*a, **k)
            seen["draws"].append(out.dtype)
            return out

        def normal(self, *a, **k):
            out = super().normal(*a, **k)
            seen["draws"].append(out.dtype)
            return out

    real_targets = cud_objective.catchup_targets

    def recording_targets(*a, **k):
        out = real_targets(*a, **k)
        seen["targets"] += [v.dtype for v in out]
        return out

    def objective(*a):
        out = OBJECTIVES["cud"](*a)
        seen["per_example"] += [v.dtype for v in out.per_example.values()]
        seen["metrics"] += [v.dtype for v in out.metrics.values()]
        return out

    monkeypatch.setattr(interpolants, "Rng", RecordingRng)
    monkeypatch.setattr(cud_objective, "catchup_targets", recording_targets)
    tf.keras.utils.set_random_seed(0)
    net = VelocityUNet(tiny_unet_config()).build_variables()
    model = CudModel(net, objective, ObjectiveConfig(order=1), OptimConfig(learning_rate=1e-3), global_batch_size=8,
                     seed=3)
    assert net.conv_in.compute_dtype == "bfloat16"  # the policy applies: bf16 activations
    images = np.random.RandomState(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    before = [v.numpy() for v in net.trainable_variables]

    # One eager step (the same code as the compiled one, without a minute of tracing on 2 busy cores).
    metrics = model.train_step({"image": tf.constant(images), "label": tf.zeros([8], tf.int32)})
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, net.trainable_variables))
    assert {v.dtype for v in net.trainable_variables} == {"float32"}  # master weights
    opt = model.optimizers_by_group["velocity"]
    assert {v.dtype for v in ema_variables(opt)} == {"float32"}  # the EMA the optimizer keeps
    assert {v.dtype for v in model.ema_net.variables if tf.as_dtype(v.dtype).is_floating} == {"float32"}
    assert {v.dtype for v in opt.variables if "iteration" not in v.path} == {"float32"}  # Adam slots
    assert seen["draws"] and set(seen["draws"]) == {tf.float32}  # t, z, h
    assert seen["targets"] and set(seen["targets"]) == {tf.float32}
    assert set(seen["per_example"]) == {tf.float32} and set(seen["metrics"]) == {tf.float32}
    assert {v.dtype for v in metrics.values()} == {tf.float32}
    # The velocity the sampler integrates is float32 too.
    v = net(tf.constant(images), tf.fill([8], 0.5), head=1)
    assert v.dtype == tf.float32

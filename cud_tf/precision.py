"""float32 or mixed_bfloat16, chosen by measurement (`--precision=auto`).

bf16 pays only where the hardware has bf16 arithmetic: CPUs with `avx512_bf16` or `amx_bf16` (oneDNN's bf16
kernels; elsewhere TF emulates bf16 and runs slower than float32), GPUs of compute capability 8.0 or higher.
`choose_precision` picks float32 without timing anything on other hardware; on bf16 hardware it times the
network's forward and backward pass (a mean-squared loss of one head, gradients of every weight) on a random
per-replica batch under each policy, and takes mixed_bfloat16 only when it is faster. The choice is cached per
network, batch, device, bf16 instructions and TensorFlow version (`cud_tf.execution`'s cache directory,
precision_choice.json), so later runs pay nothing. mixed_float16 is never chosen: it needs loss scaling and
gains nothing on CPUs; pass it explicitly on GPUs without bf16.
"""
import contextlib

import keras
import tensorflow as tf

from cud_tf import execution, run_dir
from cud_tf.networks.unet import VelocityUNet

CACHE = "precision_choice.json"
CANDIDATES = ("float32", "mixed_bfloat16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_CUDA_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores


def bf16_cpu_flags(cpuinfo: str) -> list:
    """The bf16 instruction flags (avx512_bf16, amx_bf16) of the first `flags` line of /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return sorted(set(value.split()) & set(BF16_CPU_FLAGS))
    return []


def bf16_hardware() -> dict:
    """{"bf16": bool, "device": what has or lacks bf16, "flags": CPU flags or GPU capability}: the first GPU's
    compute capability (>= 8.0) when there is a GPU, else the CPU's /proc/cpuinfo flags."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tuple(tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0))
        return dict(bf16=capability >= MIN_CUDA_CAPABILITY, device=execution.device_name(),
                    flags=f"compute capability {'.'.join(map(str, capability))}")
    try:
        with open("/proc/cpuinfo") as f:
            found = bf16_cpu_flags(f.read())
    except OSError:
        found = []
    return dict(bf16=bool(found), device=execution.device_name(), flags=" ".join(found) or "no bf16 instructions")


def cache_key(net_cfg, batch_shape, hardware: dict) -> str:
    """What decides the speed: the network, the per-replica batch, the device and its bf16 support, TF."""
    return execution.digest(dict(kind="precision", network=run_dir.to_json(net_cfg), batch=list(batch_shape),
                                 device=hardware["device"], flags=hardware["flags"], tensorflow=tf.__version__))


@contextlib.contextmanager
def global_policy(name=None):
    """Sets Keras' process-wide dtype policy to `name` (None: leaves it) and restores the previous one on exit."""
    old = keras.mixed_precision.global_policy()
    if name is not None:
        keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)


def forward_backward_step(net_cfg, batch_shape, policy):
    """A tf.function of one forward and backward pass of a fresh network `net_cfg` on a random batch `batch_shape`
    `[B, H, W, C]`, built and traced under Keras policy `policy` (so it computes in that precision whatever the
    global policy is when it runs); returns (loss, gradients)."""
    b = batch_shape[0]
    x = tf.random.stateless_normal(batch_shape, seed=[0, 1])
    t = tf.random.stateless_uniform([b], seed=[0, 2])
    y = tf.zeros([b], tf.int32) if net_cfg.num_classes else None
    with global_policy(policy):
        net = VelocityUNet(net_cfg, name="precision_probe").build_variables()

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                v = tf.cast(net(x, t, y, training=True, head=1), tf.float32)
                loss = tf.reduce_mean(tf.square(v - x))
            return loss, tape.gradient(loss, net.trainable_variables)

        step.get_concrete_function()
    return step


def forward_backward_seconds(net_cfg, batch_shape, policies, steps=3, warmup=2) -> dict:
    """{policy: median seconds} of `forward_backward_step` under each Keras policy in `policies`, the policies
    timed in alternation (`execution.interleaved_seconds`); the global policy is left as it was."""
    steps_by_policy = {p: forward_backward_step(net_cfg, batch_shape, p) for p in policies}
    return execution.interleaved_seconds(steps_by_policy, steps, warmup)


def choose_precision(net_cfg, batch_shape, steps: int = 5, warmup: int = 2, hardware=None, log=print) -> dict:
    """The faster of float32 and mixed_bfloat16 for `net_cfg` at per-replica batch `batch_shape`.

    Returns {"precision", "source": "no bf16 hardware" | "cache" | "measured", "hardware", and when timed
    "float32_s", "mixed_bfloat16_s", "key"}. hardware: `bf16_hardware()` (given: for tests)."""
    hardware = hardware or bf16_hardware()
    if not hardware["bf16"]:
        return dict(precision="float32", source="no bf16 hardware", hardware=hardware)
    key = cache_key(net_cfg, batch_shape, hardware)
    hit = execution.cached(key, CACHE)
    if hit is not None:
        return dict(hit, source="cache", key=key)
    seconds = forward_backward_seconds(net_cfg, batch_shape, CANDIDATES, steps, warmup)
    choice = dict(precision=min(CANDIDATES, key=seconds.get), hardware=hardware,
                  **{f"{p}_s": s for p, s in seconds.items()})
    execution.store(key, choice, CACHE, log)
    return dict(choice, source="measured", key=key)


def describe(choice: dict) -> str:
    """One log line of a choice."""
    timing = ""
    if "float32_s" in choice:
        timing = (f" (forward + backward: float32 {choice['float32_s'] * 1e3:.0f} ms, mixed_bfloat16 "
                  f"{choice['mixed_bfloat16_s'] * 1e3:.0f} ms)")
    hw = choice.get("hardware") or {}
    where = f"; {hw['device']}: {hw['flags']}" if hw else ""
    hint = "" if choice.get("recorded") else "; pass --precision to choose"
    return f"--precision=auto: {choice['precision']}, {choice['source']}{timing}{where}{hint}"


def per_replica_batch(global_batch_size: int, num_replicas: int, image_shape) -> list:
    """`[B / replicas, H, W, C]`."""
    return [max(global_batch_size // max(num_replicas, 1), 1), *image_shape]


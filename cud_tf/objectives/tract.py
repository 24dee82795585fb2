"""TRACT: transitive-closure time distillation of a velocity teacher; binary time distillation is its S = 2 case.

Phase p distils T_p teacher steps into T_{p+1} student steps (docs/algorithms.md section 8). The phase is a function
of the step, so one traced train step serves every phase; the teacher and self-teacher weights are swapped
in by the model (`cud_tf.models.tract.TractModel`), never here.
"""
import dataclasses

import tensorflow as tf

from cud_tf import interpolants, solvers
from cud_tf.objectives.common import LossOutput, Nets, conditioning, distance
from cud_tf.sampling import velocity_fn

TEACHER_SOLVERS = ("euler", "heun")
WEIGHTS = ("none", "truncated_snr")


def check_schedule(schedule):
    """Raises ValueError unless `schedule` is T_0 > T_1 > ... >= 1 with each T_p a multiple of T_{p+1}."""
    s = tuple(schedule)
    if len(s) < 2 or any(not isinstance(n, int) or n < 1 for n in s):
        raise ValueError(f"schedule {s} needs at least two positive step counts, e.g. 1024,32,1")
    for a, b in zip(s, s[1:]):
        if a <= b or a % b:
            raise ValueError(f"schedule {s}: each step count must be a larger multiple of the next ({a} -> {b})")


@dataclasses.dataclass(frozen=True)
class TractConfig:
    """Options of the TRACT objective and of its phases and EMAs."""

    schedule: tuple = (1024, 32, 1)  # T_0 > T_1 > ...; binary time distillation: (2^n, 2^(n-1), ..., 1)
    steps_per_phase: int = 1000
    teacher_solver: str = "euler"  # the teacher's one step of size 1/T_p: euler | heun
    weight: str = "none"  # none | truncated_snr: w(t) = max(t^2, (1 - t)^2)
    head: int = 1  # the head distilled (student) and evaluated (teacher, self-teacher)
    self_teacher_decay: float = 0.5  # mu_S
    ema_residual: float = 1e-3  # the inference EMA decay is mu_I = ema_residual^(1 / steps_per_phase)
    label_dropout: float = 0.0  # null-label probability for a class-conditional teacher
    teacher_guidance: float = 1.0  # classifier-free guidance of the original teacher (phase 0); 1 = unguided
    distance: str = "mse"

    def __post_init__(self):
        check_schedule(self.schedule)
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(f"teacher_solver={self.teacher_solver!r}; expected one of {TEACHER_SOLVERS}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"weight={self.weight!r}; expected one of {WEIGHTS}")
        if self.steps_per_phase < 1:
            raise ValueError(f"steps_per_phase={self.steps_per_phase} must be >= 1")

    @property
    def num_phases(self) -> int:
        return len(self.schedule) - 1

    @property
    def total_steps(self) -> int:
        return self.num_phases * self.steps_per_phase

    @property
    def inference_decay(self) -> float:
        """mu_I = ema_residual^(1 / steps_per_phase): a phase's first step keeps weight ~ema_residual at its end."""
        return self.ema_residual ** (1.0 / self.steps_per_phase)


def phase_of(step, cfg: TractConfig):
    """Phase p (int32 scalar) of the 0-based training step: floor(step / steps_per_phase), at most the last."""
    p = tf.cast(tf.convert_to_tensor(step), tf.int64) // cfg.steps_per_phase
    return tf.cast(tf.minimum(p, cfg.num_phases - 1), tf.int32)


def group_times(k, j, t_p, t_next):
    """Times of group k `[B]` (0..T_{p+1}-1) at offset j `[B]` (0..S-1), in teacher-grid units h = 1/T_p.

    The group runs from its upper end down: t = 1 - (k H + j h), t_mid = t - h, t' = 1 - (k + 1) H with
    H = 1/T_{p+1}. Returns float32 (t, t_mid, t_prime, t - t') `[B]`; t - t' = (S - j) h is computed exactly.
    """
    s = t_p // t_next
    i = k * s + j
    tp = tf.cast(t_p, tf.float32)
    t = 1.0 - tf.cast(i, tf.float32) / tp
    t_mid = 1.0 - tf.cast(i + 1, tf.float32) / tp
    t_prime = 1.0 - tf.cast((k + 1) * s, tf.float32) / tp
    return t, t_mid, t_prime, tf.cast(s - j, tf.float32) / tp


def target_velocity(v_teacher, v_self, x_t, t, t_mid, t_prime, dt, last, solver="euler"):
    """TRACT's two-stage target, as the velocity of one student Euler jump from t to t' (no gradient).

    1. x_mid = one `solver` step of the teacher from (x_t, t) to t_mid;
    2. x_t' = x_mid - (t_mid - t') v_self(x_mid, t_mid), or x_mid itself where `last` (j = S - 1);
    3. v* = (x_t - x_t') / (t - t'), so that x_t - (t - t') v* = x_t'.
    v_teacher, v_self: velocity functions; x_t `[B,H,W,C]`; t, t_mid, t_prime, dt = t - t' `[B]`; last `[B]` bool.
    Returns (v*, x_t') `[B,H,W,C]`.
    """
    x_t = tf.stop_gradient(x_t)
    x_mid = solvers.rk_step(v_teacher, x_t, t, t - t_mid, solver)
    x_jump = x_mid - interpolants.bcast(t_mid - t_prime, x_mid) * v_self(x_mid, t_mid)
    x_prime = tf.where(interpolants.bcast(last, x_mid), x_mid, x_jump)
    v_star = (x_t - x_prime) / interpolants.bcast(dt, x_t)
    return tf.stop_gradient(v_star), tf.stop_gradient(x_prime)


def loss_weight(t, kind):
    """w(t) `[B]`: 1, or TRACT's truncated-SNR x-space weight max(SNR, 1) mapped to velocity space,
    max(t^2, (1 - t)^2) (the x-space error is t^2 times the velocity error and SNR = (1 - t)^2 / t^2)."""
    if kind == "none":
        return tf.ones_like(t)
    if kind == "truncated_snr":
        return tf.maximum(tf.square(t), tf.square(1.0 - t))
    raise ValueError(f"unknown weight {kind!r}; expected one of {WEIGHTS}")


def _randint(r, n):
    """Integers uniform in 0..n-1 `[B]` int32 from uniforms r `[B]`; n: int32 scalar tensor."""
    return tf.minimum(tf.cast(tf.floor(r * tf.cast(n, tf.float32)), tf.int32), n - 1)


# Berthelot et al. 2023, "TRACT" (arXiv 2303.04248), sec. 3: w(t) ||v_phi(x_t, t) - sg(v*)||^2 (teacher + self-teacher).
def loss(nets: Nets, batch, rng, step, cfg: TractConfig) -> LossOutput:
    """Per-example `[B]` TRACT loss of the student `nets.velocity` in group "velocity", with targets from
    `nets.teacher` (one step) and `nets.extra["self_teacher"]` (the jump to the group end)."""
    x0 = batch["image"]
    b = tf.shape(x0)[0]
    p = phase_of(step, cfg)
    schedule = tf.constant(cfg.schedule, tf.int32)
    t_p, t_next = schedule[p], schedule[p + 1]
    s = t_p // t_next
    k = _randint(rng.uniform("group", b), t_next)
    j = _randint(rng.uniform("offset", b), s)
    t, t_mid, t_prime, dt = group_times(k, j, t_p, t_next)
    z = rng.normal("z", x0)  # the sampler's noise: a teacher's noise encoder is not used
    x_t = interpolants.x_t(x0=x0, z=z, t=t)
    y = conditioning(nets, batch, rng, cfg)

    # A guided teacher guides in phase 0 only: later teachers are students that already learnt the guided field.
    w = 1.0 if cfg.teacher_guidance == 1.0 else tf.where(p == 0, cfg.teacher_guidance, 1.0)
    v_teacher = velocity_fn(nets.teacher, cfg.head, y, guidance_scale=w)
    v_self = velocity_fn(nets.extra["self_teacher"], cfg.head, y)
    v_star, _ = target_velocity(v_teacher, v_self, x_t, t, t_mid, t_prime, dt, j == s - 1, cfg.teacher_solver)

    v = nets.velocity(x_t, t, y, training=True, head=cfg.head)
    err = distance(v, v_star, cfg.distance)
    total = loss_weight(t, cfg.weight) * err
    phase = tf.fill([b], tf.cast(p, tf.float32))
    return LossOutput(per_example={"velocity": total},
                      metrics={"loss": total, "distance": err, "phase": phase,
                               "student_steps": tf.fill([b], tf.cast(t_next, tf.float32))})

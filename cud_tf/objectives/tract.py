"""TRACT: transitive-closure time distillation of a velocity teacher, and binary time distillation as its options.

Phase p distils T_p teacher steps into T_{p+1} student steps (docs/algorithms.md section 8). The phase is a function
of the step, so one traced train step serves every phase; the teacher and self-teacher weights are swapped
in by the model (`cud_tf.models.tract.TractModel`), never here. Binary time distillation (BTD) is S = 2 with
`offsets="tops"`, `second_step="teacher"` and a fixed `inference_ema_decay` (docs/tract.md).
"""
import dataclasses
from typing import Optional

import tensorflow as tf

from cud_tf import interpolants, solvers
from cud_tf.objectives.common import LossOutput, Nets, conditioning, distance
from cud_tf.sampling import velocity_fn

TEACHER_SOLVERS = ("euler", "heun")
WEIGHTS = ("none", "truncated_snr")
OFFSETS = ("all", "tops")  # j ~ U{0..S-1} (TRACT) | j = 0, the group's upper end only (BTD)
SECOND_STEPS = ("self_teacher", "teacher")  # who takes the step from t_mid to t' (TRACT | BTD)


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
    inference_ema_decay: Optional[float] = None  # a fixed mu_I instead (BTD: 0.9995); None: the rule above
    offsets: str = "all"  # all | tops: the offsets j drawn in a group (tops: j = 0 only, BTD)
    second_step: str = "self_teacher"  # self_teacher | teacher: who jumps from t_mid to t' (teacher: BTD, S = 2)
    clip_x0: bool = False  # teacher and self-teacher steps use the velocity of x0_hat clipped to [-1, 1]
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
        if self.offsets not in OFFSETS:
            raise ValueError(f"offsets={self.offsets!r}; expected one of {OFFSETS}")
        if self.second_step not in SECOND_STEPS:
            raise ValueError(f"second_step={self.second_step!r}; expected one of {SECOND_STEPS}")
        sizes = [a // b for a, b in zip(self.schedule, self.schedule[1:])]
        if self.second_step == "teacher" and any(n != 2 for n in sizes):
            raise ValueError(f"second_step='teacher' takes two teacher steps per student step, so every phase must "
                             f"halve the step count (S = 2); schedule {tuple(self.schedule)} has S = {sizes}: "
                             "use e.g. 1024,512,...,2,1 or second_step='self_teacher'")
        d = self.inference_ema_decay
        if d is not None and not 0.0 <= d < 1.0:
            raise ValueError(f"inference_ema_decay={d} must be in [0, 1) (or None for ema_residual^(1/steps))")

    @property
    def num_phases(self) -> int:
        return len(self.schedule) - 1

    @property
    def total_steps(self) -> int:
        return self.num_phases * self.steps_per_phase

    @property
    def inference_decay(self) -> float:
        """mu_I: `inference_ema_decay` when set (BTD), else ema_residual^(1 / steps_per_phase) (TRACT: a phase's
        first step keeps weight ~ema_residual at its end)."""
        if self.inference_ema_decay is not None:
            return self.inference_ema_decay
        return self.ema_residual ** (1.0 / self.steps_per_phase)

    @property
    def uses_self_teacher(self) -> bool:
        return self.second_step == "self_teacher"


def phase_of(step, cfg: TractConfig):
    """Phase p (int32 scalar) of the 0-based training step: floor(step / steps_per_phase), at most the last."""
    p = tf.cast(tf.convert_to_tensor(step), tf.int64) // cfg.steps_per_phase
    return tf.cast(tf.minimum(p, cfg.num_phases - 1), tf.int32)


def step_counts(p, cfg: TractConfig):
    """(T_p, T_{p+1}) int32 scalars of phase p (int32 scalar tensor).

    A gather, not `schedule[p]`: XLA needs a slice's bounds at compile time, so a strided slice at the phase made
    the step counter, which the phase is computed from, a compile-time constant of the XLA step. The step was
    then compiled anew on every call (~30 s a step on 2 CPU cores, ~25x slower than graph mode)."""
    schedule = tf.constant(cfg.schedule, tf.int32)
    return tf.gather(schedule, p), tf.gather(schedule, p + 1)


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


def target_velocity(v_teacher, v_self, x_t, t, t_mid, t_prime, dt, last, solver="euler", second_solver="euler"):
    """TRACT's two-stage target, as the velocity of one student Euler jump from t to t' (no gradient).

    1. x_mid = one `solver` step of the teacher from (x_t, t) to t_mid;
    2. x_t' = one `second_solver` step of v_self from (x_mid, t_mid) to t' (Euler: x_mid - (t_mid - t') v_self),
       or x_mid itself where `last` (j = S - 1). BTD passes the teacher as v_self (and its solver);
    3. v* = (x_t - x_t') / (t - t'), so that x_t - (t - t') v* = x_t'.
    v_teacher, v_self: velocity functions; x_t `[B,H,W,C]`; t, t_mid, t_prime, dt = t - t' `[B]`; last `[B]` bool.
    Returns (v*, x_t') `[B,H,W,C]`.
    """
    x_t = tf.stop_gradient(x_t)
    x_mid = solvers.rk_step(v_teacher, x_t, t, t - t_mid, solver)
    x_jump = solvers.rk_step(v_self, x_mid, t_mid, t_mid - t_prime, second_solver)
    x_prime = tf.where(interpolants.bcast(last, x_mid), x_mid, x_jump)
    v_star = (x_t - x_prime) / interpolants.bcast(dt, x_t)
    return tf.stop_gradient(v_star), tf.stop_gradient(x_prime)


def clipped_x0_velocity(v):
    """`v(x, t)` with its data prediction clipped to the data range: the velocity of the straight path through
    (x, t) and x0_c = clip(x0_hat, -1, 1), x0_hat = x - t v(x, t):

        v_c = (x - x0_c) / t = v + (x0_hat - x0_c) / t      (t > 0; at t = 0, x0_hat = x and v_c = v).

    An Euler step x - h v_c is then the DDIM step of the clipped prediction, (1 - t + h) x0_c + (t - h) z_c with
    z_c = (x - (1 - t) x0_c) / t, and v_c = v wherever x0_hat already lies in [-1, 1].
    x `[B,H,W,C]`, t `[B]`; returns `[B,H,W,C]`.
    """
    def v_c(x, t):
        v_x = v(x, t)
        tb = interpolants.bcast(t, x)
        x0_hat = interpolants.x0_from_v(x_t=x, v=v_x, t=t)
        correction = (x0_hat - tf.clip_by_value(x0_hat, -1.0, 1.0)) / tf.where(tb > 0, tb, 1.0)
        return v_x + tf.where(tb > 0, correction, 0.0)

    return v_c


def draw_offsets(r, s, offsets):
    """Offsets j `[B]` int32 in a group of S = `s` teacher steps: uniform in 0..S-1 ("all", TRACT), or 0, the
    group's upper end ("tops", BTD). r: uniforms `[B]`."""
    if offsets == "tops":
        return tf.zeros_like(r, tf.int32)
    if offsets == "all":
        return _randint(r, s)
    raise ValueError(f"unknown offsets {offsets!r}; expected one of {OFFSETS}")


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
    `nets.teacher` (one step) and `nets.extra["self_teacher"]` (the jump to the group end), or from the teacher
    alone with `second_step="teacher"` (binary time distillation: Salimans & Ho 2022, arXiv 2202.00512)."""
    x0 = batch["image"]
    b = tf.shape(x0)[0]
    p = phase_of(step, cfg)
    t_p, t_next = step_counts(p, cfg)
    s = t_p // t_next
    k = _randint(rng.uniform("group", b), t_next)
    j = draw_offsets(rng.uniform("offset", b), s, cfg.offsets)
    t, t_mid, t_prime, dt = group_times(k, j, t_p, t_next)
    z = rng.normal("z", x0)  # the sampler's noise: a teacher's noise encoder is not used
    x_t = interpolants.x_t(x0=x0, z=z, t=t)
    y = conditioning(nets, batch, rng, cfg)

    # A guided teacher guides in phase 0 only: later teachers are students that already learnt the guided field.
    w = 1.0 if cfg.teacher_guidance == 1.0 else tf.where(p == 0, cfg.teacher_guidance, 1.0)
    v_teacher = velocity_fn(nets.teacher, cfg.head, y, guidance_scale=w)
    if cfg.uses_self_teacher:
        v_second, second_solver = velocity_fn(nets.extra["self_teacher"], cfg.head, y), "euler"
    else:  # BTD: the teacher takes both half-steps, with its own solver
        v_second, second_solver = v_teacher, cfg.teacher_solver
    if cfg.clip_x0:
        v_teacher, v_second = clipped_x0_velocity(v_teacher), clipped_x0_velocity(v_second)
    v_star, _ = target_velocity(v_teacher, v_second, x_t, t, t_mid, t_prime, dt, j == s - 1, cfg.teacher_solver,
                                second_solver)

    v = nets.velocity(x_t, t, y, training=True, head=cfg.head)
    err = distance(v, v_star, cfg.distance)
    total = loss_weight(t, cfg.weight) * err
    phase = tf.fill([b], tf.cast(p, tf.float32))
    return LossOutput(per_example={"velocity": total},
                      metrics={"loss": total, "distance": err, "phase": phase,
                               "student_steps": tf.fill([b], tf.cast(t_next, tf.float32))})

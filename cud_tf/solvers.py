"""ODE solvers for velocity fields: Butcher tableaux, one RK step, fixed-grid and adaptive samplers.

Everything here only sees a velocity function `v(x, t)`: x `[B, H, W, C]` float32, t `[B]` float32,
returning `[B, H, W, C]`. Generation integrates dx/dt = v from t = 1 (noise) DOWN to t = 0 (data)
(see `interpolants.py`), so a step of size h > 0 moves x by -h * slope and evaluates stages at t - c_i h.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from cud_tf.interpolants import bcast

GRIDS = ("uniform", "quadratic")


@dataclasses.dataclass(frozen=True)
class Tableau:
    """Explicit Butcher tableau. `a[i]` holds the i entries a_i0..a_i(i-1) (strictly lower triangular)."""

    name: str
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    def __post_init__(self):
        s = len(self.c)
        if len(self.b) != s or len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: need {s} rows of a (row i with i entries) and {s} b")

    @property
    def needed_stages(self) -> tuple[int, ...]:
        """Stages that affect the slope: one with b_i = 0 that no later stage uses is never evaluated."""
        s = len(self.c)
        need = [False] * s
        for i in reversed(range(s)):
            need[i] = self.b[i] != 0.0 or any(need[k] and self.a[k][i] != 0.0 for k in range(i + 1, s))
        return tuple(i for i in range(s) if need[i])


TABLEAUX = {
    "euler": Tableau("euler", a=((),), b=(1.0,), c=(0.0,), order=1),
    "heun": Tableau("heun", a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2),
    # Kutta (1901) third-order method.
    "rk3": Tableau("rk3", a=((), (0.5,), (-1.0, 2.0)), b=(1 / 6, 2 / 3, 1 / 6), c=(0.0, 0.5, 1.0), order=3),
    "rk4": Tableau(
        "rk4", a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
        c=(0.0, 0.5, 0.5, 1.0), order=4),
    # The CUD reference code's K=3 slope (Shao et al. 2023); only second order (docs/algorithms.md section 3).
    "reference3": Tableau(
        "reference3", a=((), (1.0,), (7 / 4, 1 / 4)), b=(5 / 12, 2 / 3, -1 / 12), c=(0.0, 1.0, 2.0), order=2),
}
ORDER_TO_TABLEAU = {1: "euler", 2: "heun", 3: "rk3", 4: "rk4"}


def get_tableau(name_or_tableau) -> Tableau:
    """Returns a `Tableau` given one or its name in `TABLEAUX`."""
    if isinstance(name_or_tableau, Tableau):
        return name_or_tableau
    if name_or_tableau not in TABLEAUX:
        raise ValueError(f"unknown tableau {name_or_tableau!r}; expected one of {sorted(TABLEAUX)}")
    return TABLEAUX[name_or_tableau]


def _scaled_sum(coeffs, ks):
    """sum_j coeffs[j] * ks[j], skipping zero coefficients and multiplications by one; None if empty."""
    terms = [k if a == 1.0 else a * k for a, k in zip(coeffs, ks) if a != 0.0]
    return tf.add_n(terms) if terms else None


def rk_slope(v, x, t, h, tableau="euler", k1=None):
    """Slope s = sum_i b_i k_i of one explicit RK step taken downwards in t.

    k_i = v(x - h * sum_j a_ij k_j, t - c_i h). x: `[B, H, W, C]`; t: `[B]`; h: `[B]` or scalar; k1: the first
    stage v(x, t) `[B, H, W, C]` when the caller already has it (c_1 = 0 in every explicit tableau).
    Returns s `[B, H, W, C]`; the step itself is `x - h * s` (`rk_step`).
    """
    tab = get_tableau(tableau)
    t = tf.convert_to_tensor(t, x.dtype)
    h = tf.convert_to_tensor(h, x.dtype)
    h_x = bcast(h, x)
    ks = [None] * len(tab.c)
    for i in tab.needed_stages:
        dx = _scaled_sum(tab.a[i], ks[:i])
        x_i = x if dx is None else x - h_x * dx
        t_i = t if tab.c[i] == 0.0 else t - tab.c[i] * h
        ks[i] = k1 if (i == 0 and k1 is not None) else v(x_i, t_i)
    return _scaled_sum(tab.b, ks)


def rk_step(v, x, t, h, tableau="euler"):
    """One explicit RK step from t to t - h: `x - h * rk_slope(...)`, shapes as in `rk_slope`."""
    x = tf.convert_to_tensor(x)
    return x - bcast(h, x) * rk_slope(v, x, t, h, tableau)


def time_grid(num_steps, kind="uniform", dtype=tf.float32):
    """Decreasing times `[N + 1]` from 1 to exactly 0.

    uniform: 1 - i/N; quadratic: (1 - i/N)^2 (finer near data). num_steps: Python int or scalar int tensor.
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}; expected one of {GRIDS}")
    n = tf.cast(num_steps, dtype)
    u = 1.0 - tf.range(tf.cast(num_steps, tf.int32) + 1, dtype=dtype) / n
    return u if kind == "uniform" else tf.square(u)


def _is_matched_heun(method):
    return get_tableau(method).name == "heun"


def sample(v, z, num_steps, method="euler", grid="uniform"):
    """Fixed-grid integration of dx/dt = v from t = 1 (x = z) to t = 0. z and the returned x0: `[B, H, W, C]`.

    method: a tableau name or `Tableau`. A tableau named "heun" is NFE-matched as in EDM (Karras et al. 2022):
    every step Heun except the last, which is Euler, so NFE = 2N - 1. num_steps: a Python int (steps unrolled)
    or a scalar integer tensor (a `tf.while_loop`, e.g. for SavedModel signatures taking num_steps as input).
    grid: one of `GRIDS`. Tableaux with c_i > 1 (reference3) evaluate v at t < 0 on the last step.
    """
    tab = get_tableau(method)
    x = tf.convert_to_tensor(z)
    batch = tf.shape(x)[0]
    ts = time_grid(num_steps, grid, x.dtype)
    last = TABLEAUX["euler"] if _is_matched_heun(tab) else tab

    def step(i, x, tableau):
        t, t_next = ts[i], ts[i + 1]
        return rk_step(v, x, tf.fill([batch], t), t - t_next, tableau)

    if isinstance(num_steps, (int, np.integer)):
        num_steps = int(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        for i in range(num_steps - 1):
            x = step(i, x, tab)
        return step(num_steps - 1, x, last)

    n = tf.cast(num_steps, tf.int32)
    tf.debugging.assert_positive(n, message="num_steps must be >= 1")
    _, x = tf.while_loop(
        lambda i, x: i < n - 1, lambda i, x: (i + 1, step(i, x, tab)), (tf.constant(0), x),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]).concatenate(x.shape[1:])))
    return step(n - 1, x, last)


def nfe(method, num_steps) -> int:
    """Number of velocity evaluations `sample(..., num_steps, method)` makes."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if _is_matched_heun(method):
        return 2 * num_steps - 1
    return len(get_tableau(method).needed_stages) * num_steps


def steps_for_nfe(method, nfe) -> int:
    """Largest step count N with `nfe(method, N) <= nfe`; ValueError if even N = 1 costs more."""
    steps = (nfe + 1) // 2 if _is_matched_heun(method) else nfe // len(get_tableau(method).needed_stages)
    if steps < 1:
        raise ValueError(f"method {method!r} needs more than {nfe} evaluations for one step")
    return steps


def one_step(v, z):
    """One-step generation `x0 = z - v(z, 1)`; z `[B, H, W, C]`."""
    z = tf.convert_to_tensor(z)
    return z - v(z, tf.ones(tf.shape(z)[:1], z.dtype))


def sample_rk45(v, z, rtol=1e-5, atol=1e-5):
    """Adaptive Dormand-Prince (scipy `solve_ivp`, RK45) from t = 1 to 0, as in score_sde's ODE sampler.

    z: `[B, H, W, C]`. Returns (x0 `[B, H, W, C]` tf.Tensor of z's dtype, nfe: int). Runs eagerly (host loop).
    """
    import scipy.integrate

    z = tf.convert_to_tensor(z)
    shape, dtype = z.shape, z.dtype
    v_fn = tf.function(v, input_signature=[tf.TensorSpec(shape, dtype), tf.TensorSpec(shape[:1], dtype)])
    t_fill = np.ones(shape[:1], dtype.as_numpy_dtype)

    def ode(t, y):
        x = tf.constant(y.reshape(shape), dtype)
        return v_fn(x, tf.constant(t * t_fill, dtype)).numpy().reshape(-1).astype(np.float64)

    sol = scipy.integrate.solve_ivp(
        ode, (1.0, 0.0), z.numpy().reshape(-1).astype(np.float64), rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"RK45 failed: {sol.message}")
    return tf.constant(sol.y[:, -1].reshape(shape), dtype), int(sol.nfev)

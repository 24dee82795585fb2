"""Tests for cud_tf.solvers on toy velocity fields (no networks)."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from cud_tf import solvers

LAM = 2.0
# Pure Heun at every step (the name "heun" selects the NFE-matched sampler with a final Euler step).
HEUN_FULL = dataclasses.replace(solvers.TABLEAUX["heun"], name="heun_full")
METHODS = [*solvers.TABLEAUX, HEUN_FULL]


def _t4(t):
    return tf.reshape(t, [-1, 1, 1, 1])


def v_autonomous(x, t):
    """dx/dt = LAM x, integrated from t = 1 down to 0: x(0) = x(1) exp(-LAM)."""
    del t
    return LAM * x


def v_time_varying(x, t):
    """dx/dt = LAM (1 + t) x: x(0) = x(1) exp(-1.5 LAM). Exercises the nodes c_i."""
    return LAM * (1.0 + _t4(t)) * x


def v_nonlinear(x, t):
    """A per-example nonlinear field, for checks that do not need an exact solution."""
    return tf.sin(3.0 * x) * (1.0 + _t4(t)) + x * _t4(t) ** 2


def _z(batch=2):
    return tf.constant(np.linspace(0.5, 1.5, batch * 2 * 3 * 1).reshape(batch, 2, 3, 1), tf.float32)


# First step count of the doubling pair, chosen so both errors sit in the asymptotic range and well above
# float32 rounding (the smallest relative error here is ~5e-6).
_BASE_STEPS = {"euler": 16, "heun": 16, "rk3": 8, "rk4": 8, "reference3": 16, "heun_full": 16}


@pytest.mark.parametrize(
    "v, decay", [(v_autonomous, np.exp(-LAM)), (v_time_varying, np.exp(-1.5 * LAM))],
    ids=["autonomous", "time_varying"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: solvers.get_tableau(m).name)
def test_convergence_order(method, v, decay):
    tab = solvers.get_tableau(method)
    z = _z()
    exact = z.numpy() * decay
    n = _BASE_STEPS[tab.name]
    errs = [np.max(np.abs(solvers.sample(v, z, k, method).numpy() - exact)) for k in (n, 2 * n)]
    observed = np.log2(errs[0] / errs[1])
    assert errs[1] > 1e-6 * np.max(np.abs(exact)), errs  # well above float32 noise
    assert abs(observed - tab.order) < 0.3, (tab.name, errs, observed)


def test_reference3_is_only_second_order():
    assert solvers.TABLEAUX["reference3"].order == 2
    assert solvers.ORDER_TO_TABLEAU == {1: "euler", 2: "heun", 3: "rk3", 4: "rk4"}
    for k, name in solvers.ORDER_TO_TABLEAU.items():
        assert solvers.TABLEAUX[name].order == k


@pytest.mark.parametrize("name", list(solvers.TABLEAUX))
def test_tableau_consistency(name):
    tab = solvers.TABLEAUX[name]
    assert sum(tab.b) == pytest.approx(1.0)
    for row, c in zip(tab.a, tab.c):
        assert sum(row) == pytest.approx(c)


def test_get_tableau_errors_and_validation():
    assert solvers.get_tableau(HEUN_FULL) is HEUN_FULL
    with pytest.raises(ValueError, match="rk4"):
        solvers.get_tableau("rk5")
    with pytest.raises(ValueError):
        solvers.Tableau("bad", a=((), (1.0, 2.0)), b=(0.5, 0.5), c=(0.0, 1.0), order=2)


@pytest.mark.parametrize("name", list(solvers.TABLEAUX))
def test_rk_slope_per_example_h(name):
    x = _z(batch=3)
    t = tf.constant([1.0, 0.6, 0.3])
    h = tf.constant([0.0, 0.1, 0.25])
    s = solvers.rk_slope(v_nonlinear, x, t, h, name)
    assert s.shape == x.shape
    for b in range(3):
        s_b = solvers.rk_slope(v_nonlinear, x[b:b + 1], t[b:b + 1], float(h[b]), name)
        np.testing.assert_allclose(s[b:b + 1].numpy(), s_b.numpy(), rtol=1e-5, atol=1e-6)
    # h = 0 gives v(x, t) itself (sum b_i = 1).
    np.testing.assert_allclose(s[:1].numpy(), v_nonlinear(x[:1], t[:1]).numpy(), rtol=1e-5, atol=1e-6)
    x_next = solvers.rk_step(v_nonlinear, x, t, h, name)
    np.testing.assert_allclose(x_next.numpy(), (x - tf.reshape(h, [-1, 1, 1, 1]) * s).numpy(), atol=1e-6)


def test_rk_slope_stage_times():
    """Stages are evaluated at t - c_i h (downwards in t)."""
    seen = []

    def v(x, t):
        seen.append(float(t[0]))
        return tf.zeros_like(x)

    solvers.rk_slope(v, _z(1), tf.constant([0.9]), 0.2, "rk4")
    np.testing.assert_allclose(seen, [0.9, 0.8, 0.8, 0.7], atol=1e-6)


def _counting(v):
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return v(x, t)

    return counted, calls


@pytest.mark.parametrize("method", METHODS, ids=lambda m: solvers.get_tableau(m).name)
def test_nfe_matches_counted_calls(method):
    for n in (1, 2, 3, 5):
        v, calls = _counting(v_nonlinear)
        solvers.sample(v, _z(), n, method)
        assert calls[0] == solvers.nfe(method, n)
        assert solvers.steps_for_nfe(method, calls[0]) == n
        assert solvers.steps_for_nfe(method, calls[0] + 1) in (n, n + 1)
        assert solvers.nfe(method, solvers.steps_for_nfe(method, calls[0] + 1)) <= calls[0] + 1


def test_heun_nfe_is_2n_minus_1():
    for n in (1, 4, 8):
        v, calls = _counting(v_nonlinear)
        solvers.sample(v, _z(), n, "heun")
        assert calls[0] == 2 * n - 1
    assert solvers.steps_for_nfe("heun", 15) == 8
    assert solvers.steps_for_nfe("rk4", 15) == 3
    with pytest.raises(ValueError):
        solvers.steps_for_nfe("rk4", 3)


def test_zero_coefficients_skipped():
    v, calls = _counting(v_nonlinear)
    solvers.rk_slope(v, _z(), tf.ones([2]), 0.1, "rk4")
    assert calls[0] == 4
    lazy = solvers.Tableau("lazy", a=((), (1.0,), (0.5, 0.5)), b=(0.5, 0.5, 0.0), c=(0.0, 1.0, 1.0), order=2)
    assert lazy.needed_stages == (0, 1)
    assert solvers.nfe(lazy, 3) == 6


@pytest.mark.parametrize("grid", solvers.GRIDS)
def test_time_grid(grid):
    ts = solvers.time_grid(4, grid).numpy()
    assert ts.dtype == np.float32 and ts.shape == (5,)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    u = 1.0 - np.arange(5) / 4
    np.testing.assert_allclose(ts, u if grid == "uniform" else u ** 2, atol=1e-7)
    np.testing.assert_allclose(solvers.time_grid(tf.constant(4), grid).numpy(), ts)
    with pytest.raises(ValueError, match="uniform"):
        solvers.time_grid(4, "cosine")


@pytest.mark.parametrize(
    "method, grid", [("euler", "uniform"), ("heun", "uniform"), ("rk4", "uniform"), ("heun", "quadratic")])
def test_python_int_and_tensor_steps_agree_in_tf_function(method, grid):
    z = _z()

    @tf.function
    def fixed(z):
        return solvers.sample(v_nonlinear, z, 6, method, grid)

    @tf.function(input_signature=[tf.TensorSpec([None, 2, 3, 1]), tf.TensorSpec([], tf.int32)])
    def dynamic(z, n):
        return solvers.sample(v_nonlinear, z, n, method, grid)

    expected = solvers.sample(v_nonlinear, z, 6, method, grid).numpy()  # eager
    np.testing.assert_allclose(fixed(z).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dynamic(z, tf.constant(6)).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        dynamic(z, tf.constant(1)).numpy(), solvers.sample(v_nonlinear, z, 1, method, grid).numpy(),
        rtol=1e-5, atol=1e-6)


def test_quadratic_grid_converges():
    z = _z()
    exact = z.numpy() * np.exp(-1.5 * LAM)
    err = np.max(np.abs(solvers.sample(v_time_varying, z, 16, "rk4", "quadratic").numpy() - exact))
    assert err < 1e-4


def test_savedmodel_with_tensor_num_steps(tmp_path):
    class Sampler(tf.Module):
        def __init__(self):
            super().__init__()
            self.lam = tf.Variable(LAM)

        @tf.function(input_signature=[tf.TensorSpec([None, 2, 3, 1]), tf.TensorSpec([], tf.int32)])
        def sample(self, z, num_steps):
            return solvers.sample(lambda x, t: self.lam * x, z, num_steps, "heun")

    tf.saved_model.save(Sampler(), str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    z = _z()
    expected = solvers.sample(v_autonomous, z, 5, "heun").numpy()
    np.testing.assert_allclose(loaded.sample(z, tf.constant(5)).numpy(), expected, rtol=1e-6)


def test_one_step():
    z = _z()
    expected = z - v_nonlinear(z, tf.ones([2]))
    np.testing.assert_allclose(solvers.one_step(v_nonlinear, z).numpy(), expected.numpy(), atol=1e-7)


def test_sample_rk45():
    z = _z()
    x0, nfe = solvers.sample_rk45(v_time_varying, z)
    assert isinstance(x0, tf.Tensor) and x0.dtype == tf.float32 and x0.shape == z.shape
    assert isinstance(nfe, int) and nfe > 0
    np.testing.assert_allclose(x0.numpy(), z.numpy() * np.exp(-1.5 * LAM), atol=1e-4)

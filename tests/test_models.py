"""Tests for fedjax_lab.models: conv formulations, zoo shapes, adapters, masked losses/metrics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fedjax_lab.models as fm

RTOL = 1e-4
ATOL = 1e-5


def _close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _tree_close(a, b, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        _close(x, y, rtol, atol)


# ------------------------------------------------------------------------ convolutions


def _conv_inputs(kernel_hw=(3, 3), cin=3, cout=4, seed=0):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (2, 7, 6, cin))
    kernel = jax.random.normal(kk, (*kernel_hw, cin, cout))
    return x, kernel


def _weighted_sum(formulation, padding, g):
    return lambda x, k: jnp.sum(fm.conv2d(x, k, padding=padding, formulation=formulation) * g)


@pytest.mark.parametrize("formulation", ["patches", "canonical_vjp"])
@pytest.mark.parametrize(
    "padding, kernel_hw",
    [("SAME", (3, 3)), ("VALID", (3, 3)), ("SAME", (2, 3)), (((2, 0), (1, 3)), (3, 2))],
)
def test_conv_forward_and_grads_match_lax(formulation, padding, kernel_hw):
    x, kernel = _conv_inputs(kernel_hw)
    ref = fm.conv2d(x, kernel, padding=padding, formulation="lax")
    out = fm.conv2d(x, kernel, padding=padding, formulation=formulation)
    assert out.shape == ref.shape
    _close(out, ref)
    # A random output cotangent makes every output position count differently.
    g = jax.random.normal(jax.random.key(7), ref.shape)
    dx_ref, dk_ref = jax.grad(_weighted_sum("lax", padding, g), (0, 1))(x, kernel)
    dx, dk = jax.grad(_weighted_sum(formulation, padding, g), (0, 1))(x, kernel)
    _close(dx, dx_ref)
    _close(dk, dk_ref)


def test_conv_output_shapes_and_numpy_reference():
    x, kernel = _conv_inputs((3, 3), cin=2, cout=3)
    xn, kn = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    expect = np.zeros((2, 5, 4, 3))
    for i in range(5):
        for j in range(4):
            expect[:, i, j] = np.einsum("nabc,abco->no", xn[:, i : i + 3, j : j + 3], kn)
    for form in fm.CONV_FORMULATIONS:
        _close(fm.conv2d(x, kernel, padding="VALID", formulation=form), expect)
        assert fm.conv2d(x, kernel, padding="SAME", formulation=form).shape == (2, 7, 6, 3)


@pytest.mark.parametrize("formulation", ["patches", "canonical_vjp"])
def test_conv_under_vmap_with_per_client_kernels(formulation):
    num_clients = 3
    kx, kk, kg = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(kx, (num_clients, 2, 6, 6, 2))
    ks = jax.random.normal(kk, (num_clients, 3, 3, 2, 4))
    gs = jax.random.normal(kg, (num_clients, 2, 6, 6, 4))

    def client_grads(form):
        def f(x, k, g):
            return jax.grad(_weighted_sum(form, "SAME", g), (0, 1))(x, k)

        return f

    dx, dk = jax.jit(jax.vmap(client_grads(formulation)))(xs, ks, gs)
    reference = jax.jit(client_grads("lax"))
    for c in range(num_clients):
        dx_ref, dk_ref = reference(xs[c], ks[c], gs[c])
        _close(dx[c], dx_ref)
        _close(dk[c], dk_ref)


def test_canonical_vjp_inside_scan_matches_lax():
    x, kernel = _conv_inputs((3, 3), cin=2, cout=2)
    targets = jax.random.normal(jax.random.key(3), (4, *x.shape[:3], 2))

    def train(form):
        def step(k, t):
            loss = lambda k: jnp.mean((fm.conv2d(x, k, formulation=form) - t) ** 2)
            return k - 0.1 * jax.grad(loss)(k), loss(k)

        return jax.jit(lambda k: jax.lax.scan(step, k, targets))

    k_ref, losses_ref = train("lax")(kernel)
    k_can, losses_can = train("canonical_vjp")(kernel)
    _close(k_can, k_ref)
    _close(losses_can, losses_ref)
    assert not np.allclose(np.asarray(k_ref), np.asarray(kernel))  # training moved the kernel


@pytest.mark.parametrize("pcast", [False, True])
def test_canonical_vjp_under_shard_map_type_checks_and_matches_lax(pcast):
    """check_vma=True: a replicated kernel's gradient is summed over devices, like lax's AD."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",))
    xs = jax.random.normal(jax.random.key(0), (n, 2, 5, 5, 2))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 3))
    xs = jax.device_put(xs, NamedSharding(mesh, P("d")))

    def grads(form):
        def per_device(x, k):
            if pcast:  # per-client training: params marked as varying first
                k = jax.lax.pcast(k, "d", to="varying")
            loss = lambda k: jnp.sum(fm.conv2d(x[0], k, formulation=form) ** 2)
            return jax.grad(loss)(k)[None]

        spec = dict(mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
        return jax.jit(jax.shard_map(per_device, **spec))(xs, kernel)

    _close(grads("canonical_vjp"), grads("lax"))


def test_resolve_conv_and_bad_input():
    assert fm.resolve_conv("auto", backend="cpu") == "canonical_vjp"
    assert fm.resolve_conv("auto", backend="gpu") == "lax"
    assert fm.resolve_conv("patches") == "patches"
    with pytest.raises(ValueError, match="formulation"):
        fm.resolve_conv("winograd")
    x, kernel = _conv_inputs()
    with pytest.raises(ValueError, match="kernel"):
        fm.conv2d(x, kernel[:, :, :2])
    with pytest.raises(ValueError, match="x:"):
        fm.conv2d(x[0], kernel)
    with pytest.raises(ValueError, match="padding"):
        fm.conv2d(x, kernel, padding="FULL")


# --------------------------------------------------------------------------------- zoo

KEY = jax.random.key(0)


def test_logistic_regression_and_mlp_shapes():
    lr = fm.logistic_regression((3, 4), 5)
    p = lr.init(KEY)
    assert lr.apply(p, jnp.ones((2, 3, 4))).shape == (2, 5)
    assert fm.num_params(p) == 12 * 5 + 5
    m = fm.mlp((6,), hidden=(7, 8), num_classes=3)
    p = m.init(KEY)
    assert m.apply(p, jnp.ones((4, 6))).shape == (4, 3)
    assert fm.num_params(p) == 6 * 7 + 7 + 7 * 8 + 8 + 8 * 3 + 3
    with pytest.raises(ValueError, match="num_classes"):
        fm.mlp((6,), num_classes=0)


_TINY_CNN = dict(features=(2, 3), dense=5)


def test_cnn_shapes_and_formulations_agree():
    ref = fm.cnn((8, 8, 1), 4, conv="lax", **_TINY_CNN)
    params = ref.init(KEY)
    # conv3x3 VALID: 8 -> 6 -> 4, pool -> 2: dense input 2 * 2 * 3 = 12.
    assert params["Dense_0"]["kernel"].shape == (12, 5)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    logits = ref.apply(params, x)
    assert logits.shape == (3, 4)
    for form in ("patches", "canonical_vjp", "auto"):
        model = fm.cnn((8, 8, 1), 4, conv=form, **_TINY_CNN)
        _close(model.apply(params, x), logits)
    # (H, W) inputs get a channel axis.
    assert fm.cnn((8, 8), 4, **_TINY_CNN).apply(params, x[..., 0]).shape == (3, 4)
    with pytest.raises(ValueError, match="formulation"):
        fm.cnn(conv="fft")


def test_cnn_dropout_only_in_training():
    model = fm.cnn((8, 8, 1), 4, dropout=(0.5, 0.5), **_TINY_CNN)
    params = model.init(KEY)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    ev = model.apply(params, x)
    _close(model.apply(params, x, key=jax.random.key(5)), ev)  # train=False ignores the key
    a = model.apply(params, x, key=jax.random.key(5), train=True)
    b = model.apply(params, x, key=jax.random.key(6), train=True)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    _close(model.apply(params, x, key=jax.random.key(5), train=True), a)
    with pytest.raises(ValueError, match="dropout"):
        fm.cnn(dropout=1.5)


def test_char_lstm_shapes_and_causality():
    model = fm.char_lstm(vocab_size=7, embed=3, hidden=5, num_layers=2)
    params = jax.jit(model.init)(KEY)
    apply = jax.jit(model.apply)
    x = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
    logits = apply(params, x)
    assert logits.shape == (2, 6, 7)
    # The recurrence runs forward in time: changing the last token leaves earlier logits alone.
    x2 = x.at[:, -1].set((x[:, -1] + 1) % 7)
    logits2 = apply(params, x2)
    _close(logits2[:, :-1], logits[:, :-1])
    assert not np.allclose(np.asarray(logits2[:, -1]), np.asarray(logits[:, -1]))


def test_resnet_shapes_groupnorm_and_no_batchnorm():
    model = fm.resnet(
        6, input_shape=(4, 4, 3), stage_sizes=(1, 1), width=4, groups=2, conv="canonical_vjp"
    )
    params = jax.jit(model.init)(KEY)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    logits = jax.jit(model.apply)(params, x)
    assert logits.shape == (2, 6)
    # Stage 2 doubles the width and projects the shortcut with a 1x1 (dense) layer.
    assert params["_ResBlock_1"]["shortcut"]["kernel"].shape == (4, 8)
    names = {k for path, _ in jax.tree_util.tree_leaves_with_path(params) for k in map(str, path)}
    assert any("GroupNorm" in n for n in names)
    lax_model = fm.resnet(6, input_shape=(4, 4, 3), stage_sizes=(1, 1), width=4, conv="lax")
    _close(jax.jit(lax_model.apply)(params, x), logits)
    with pytest.raises(ValueError, match="groups"):
        fm.resnet(width=6, groups=4)


# ---------------------------------------------------------------------------- adapters


class _DropMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(3)(x)


def test_from_flax_matches_module_apply_and_passes_dropout_key():
    x = jax.random.normal(jax.random.key(1), (4, 5))
    model = fm.from_flax(_DropMLP(), x)
    params = model.init(KEY)
    expect = _DropMLP().apply({"params": params}, x, train=False)
    _close(model.apply(params, x), expect)
    dkey = jax.random.key(9)
    got = model.apply(params, x, key=dkey, train=True)
    _close(got, _DropMLP().apply({"params": params}, x, train=True, rngs={"dropout": dkey}))
    assert not np.allclose(np.asarray(got), np.asarray(expect))
    assert not np.allclose(
        np.asarray(model.init(jax.random.key(1))["Dense_0"]["kernel"]),
        np.asarray(params["Dense_0"]["kernel"]),
    )


class _WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True)(x)


def test_from_flax_rejects_batchnorm_and_non_modules():
    model = fm.from_flax(_WithBatchNorm(), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="GroupNorm"):
        model.init(KEY)
    with pytest.raises(TypeError, match="module"):
        fm.from_flax(lambda x: x, jnp.zeros((1, 3)))


class _NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def test_from_nnx_factory_is_pure_and_differentiable():
    model = fm.from_nnx(_NNXNet)
    params = model.init(KEY)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
    other = model.init(jax.random.key(1))
    flat = lambda p: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(p)])
    assert not np.allclose(flat(params), flat(other))
    x = jax.random.normal(jax.random.key(2), (4, 5))
    net = _NNXNet(nnx.Rngs(0))
    nnx.update(net, params)
    net.eval()
    _close(model.apply(params, x), net(x))
    # Dropout: active only in training, driven by the key, reproducible.
    a = model.apply(params, x, key=jax.random.key(3), train=True)
    b = model.apply(params, x, key=jax.random.key(4), train=True)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    _close(model.apply(params, x, key=jax.random.key(3), train=True), a)
    # Works under jit and grad through the pure params pytree.
    loss = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))
    grads = loss(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0


def test_from_nnx_instance_and_bad_input():
    net = nnx.Linear(4, 2, rngs=nnx.Rngs(3))
    model = fm.from_nnx(net)
    params = model.init(KEY)
    x = jnp.ones((2, 4))
    _close(model.apply(params, x), net(x))
    with pytest.raises(TypeError, match="module"):
        fm.from_nnx(3)


# --------------------------------------------------------------------- losses, metrics


def _identity_model():
    """Logits are the inputs: loss and metrics can be checked by hand."""
    return fm.Model(init=lambda key: {}, apply=lambda params, x, *, key=None, train=False: x)


def _np_ce(logits, y):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return lse - np.take_along_axis(logits, np.asarray(y)[..., None], -1)[..., 0]


def test_loss_matches_numpy_and_padding_changes_nothing():
    model = fm.mlp((4,), hidden=(6,), num_classes=3)
    loss_fn = fm.classification_loss(model)
    params = model.init(KEY)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    y = jnp.array([0, 2, 1])
    real = {"x": x, "y": y, "mask": jnp.ones(3)}
    logits = model.apply(params, x)
    _close(loss_fn(params, real, KEY), np.mean(_np_ce(logits, y)))
    # Two padding rows with garbage inputs and out-of-range labels.
    padded = {
        "x": jnp.concatenate([x, 1e3 * jnp.ones((2, 4))]),
        "y": jnp.concatenate([y, jnp.array([-1, 99])]),
        "mask": jnp.array([1.0, 1.0, 1.0, 0.0, 0.0]),
    }
    grad = jax.jit(jax.value_and_grad(loss_fn))
    v_real, g_real = grad(params, real, KEY)
    v_pad, g_pad = grad(params, padded, KEY)
    _close(v_pad, v_real)
    _tree_close(g_pad, g_real)
    # All-zero mask: loss 0 and a finite, zero gradient.
    empty = dict(padded, mask=jnp.zeros(5))
    v0, g0 = grad(params, empty, KEY)
    assert float(v0) == 0.0
    for leaf in jax.tree.leaves(g0):
        assert np.all(np.isfinite(np.asarray(leaf)))
        assert np.all(np.asarray(leaf) == 0.0)


def test_sequence_loss_with_pad_id_matches_numpy():
    logits = jax.random.normal(jax.random.key(1), (3, 4, 5))
    y = jnp.array([[1, 2, 0, 0], [3, 4, 1, 2], [2, 2, 2, 0]])
    mask = jnp.array([1.0, 1.0, 0.0])
    batch = {"x": logits, "y": y, "mask": mask}
    ce = _np_ce(logits, y)
    w = np.asarray(mask)[:, None] * (np.asarray(y) != 0)
    loss = fm.classification_loss(_identity_model(), pad_id=0)({}, batch, KEY)
    _close(loss, np.sum(ce * w) / np.sum(w))
    no_pad = fm.classification_loss(_identity_model())({}, batch, KEY)
    _close(no_pad, np.sum(ce * np.asarray(mask)[:, None]) / 8)
    with pytest.raises(ValueError, match="y"):
        fm.classification_loss(_identity_model())({}, dict(batch, y=y[:, :2]), KEY)


def test_metrics_sums_on_a_hand_example():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    y = jnp.array([0, 2, 2, 1])
    batch = {"x": logits, "y": y, "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
    m = fm.classification_metrics(_identity_model())({}, batch)
    assert float(m["num_examples"]) == 3.0
    assert float(m["num_correct"]) == 2.0  # rows 0 and 2; row 3 is padding
    _close(m["loss_sum"], np.sum(_np_ce(logits, y)[:3]))
    # Sequences: counts are over real positions.
    seq = {"x": logits[None], "y": jnp.array([[0, 2, 2, 0]]), "mask": jnp.ones(1)}
    ms = fm.classification_metrics(_identity_model(), pad_id=0)({}, seq)
    assert float(ms["num_examples"]) == 2.0
    assert float(ms["num_correct"]) == 1.0
    _close(ms["loss_sum"], np.sum(_np_ce(logits, jnp.array([0, 2, 2, 0]))[1:3]))

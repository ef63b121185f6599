"""2-D convolutions (NHWC inputs, HWIO kernels, stride 1) in several formulations.

XLA:CPU runs the same convolution at very different speeds depending on where it sits: a
convolution whose gradient is taken inside a ``lax.scan`` body (the engine's local-training loop)
keeps its backward convolutions in non-canonical dimension orders that miss the fast CPU kernel
(about 15x slower, measured on XLA:CPU with jax 0.10.2). The formulations here compute the same
function and the same gradients, and differ only in the XLA program they produce:

* ``"lax"``: plain :func:`jax.lax.conv_general_dilated`; JAX derives the backward pass.
* ``"patches"``: :func:`jax.lax.conv_general_dilated_patches` (im2col) followed by an ``einsum``;
  forward and backward are matmuls plus gathers.
* ``"canonical_vjp"``: the ``lax`` forward with a :func:`jax.custom_vjp` whose backward pass is
  two canonical NHWC/HWIO convolutions with explicit transposes (see :func:`conv2d`).
* ``"auto"``: resolved when traced by :func:`resolve_conv` from the default backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_FORMULATIONS: tuple[str, ...] = ("lax", "patches", "canonical_vjp")
"""The concrete formulations :func:`conv2d` accepts (plus ``"auto"``)."""

_DN = ("NHWC", "HWIO", "NHWC")

Padding = str | Sequence[tuple[int, int]]


def resolve_conv(formulation: str, backend: str | None = None) -> str:
    """Returns the concrete formulation ``formulation`` stands for on ``backend``.

    ``"auto"`` is ``"canonical_vjp"`` on CPU (fastest inside the engine's ``lax.scan`` over local
    steps under a sequential ``lax.map``, see :func:`fedjax_lab.models.cnn` for the numbers) and
    ``"lax"`` on every other backend (cuDNN/TPU convolutions have no such slow path). Any other
    name is checked and returned unchanged.

    Args:
      formulation: ``"auto"`` or one of :data:`CONV_FORMULATIONS`.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; ``None`` means ``jax.default_backend()``.

    Returns:
      One of :data:`CONV_FORMULATIONS`.

    Example:
      >>> resolve_conv("auto", backend="cpu"), resolve_conv("auto", backend="gpu")
      ('canonical_vjp', 'lax')
    """
    if formulation == "auto":
        backend = jax.default_backend() if backend is None else backend
        return "canonical_vjp" if backend == "cpu" else "lax"
    if formulation not in CONV_FORMULATIONS:
        raise ValueError(
            f"formulation: unknown convolution formulation {formulation!r}; use 'auto' or one of "
            f"{CONV_FORMULATIONS}."
        )
    return formulation


def _pad_pairs(padding: Padding, kernel_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Explicit ``(low, high)`` padding per spatial dim for stride 1."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)
        raise ValueError(
            f"padding: expected 'SAME', 'VALID' or two (low, high) pairs, got {padding!r}."
        )
    pairs = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"padding: expected 'SAME', 'VALID' or two (low, high) pairs, got {padding!r}."
        )
    return pairs  # type: ignore[return-value]


def _lax_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_DN)


def _patches_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    kh, kw, cin, cout = kernel.shape
    patches = lax.conv_general_dilated_patches(
        x, (kh, kw), (1, 1), pads, dimension_numbers=_DN
    )  # [N, H', W', cin * kh * kw], feature index = (c, i, j) in row-major order
    w = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)
    return jnp.einsum("nhwk,ko->nhwo", patches, w)


def _varying_axes(x: jax.Array) -> frozenset:
    """The ``shard_map`` mesh axes along which ``x`` varies (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def _match_vma(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Sums a cotangent over the ``shard_map`` axes it varies along but its primal does not.

    This is what JAX's own autodiff does for a replicated input used by per-device values (the
    transpose of the implicit ``pcast(..., to="varying")`` is a ``psum``), so the custom VJP
    type-checks under ``shard_map(check_vma=True)`` and matches ``"lax"`` there. Outside
    ``shard_map`` both sets are empty and nothing happens.
    """
    extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return lax.psum(cotangent, extra) if extra else cotangent


def _canonical_conv(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
    @jax.custom_vjp
    def conv(x, kernel):
        return _lax_conv(x, kernel, pads)

    def fwd(x, kernel):
        return _lax_conv(x, kernel, pads), (x, kernel)

    def bwd(res, g):
        x, kernel = res
        kh, kw = kernel.shape[:2]
        # Input gradient: full-padded conv of g with the flipped, in/out-swapped kernel.
        w_t = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))  # [kh, kw, cout, cin]
        dpads = (
            (kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
            (kw - 1 - pads[1][0], kw - 1 - pads[1][1]),
        )
        dx = _lax_conv(g, w_t, dpads)
        # Weight gradient: input channels as the batch, the batch as the input features.
        lhs = jnp.transpose(x, (3, 1, 2, 0))  # [cin, H, W, N]
        rhs = jnp.transpose(g, (1, 2, 0, 3))  # [H', W', N, cout]
        dw = _lax_conv(lhs, rhs, pads)  # [cin, kh, kw, cout]
        dw = jnp.transpose(dw, (1, 2, 0, 3))
        return _match_vma(dx.astype(x.dtype), x), _match_vma(dw.astype(kernel.dtype), kernel)

    conv.defvjp(fwd, bwd)
    return conv(x, kernel)


_IMPLS = {"lax": _lax_conv, "patches": _patches_conv, "canonical_vjp": _canonical_conv}


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    padding: Padding = "SAME",
    formulation: str = "auto",
) -> jax.Array:
    """Stride-1 2-D convolution ``y = x * kernel`` (NHWC input, HWIO kernel, NHWC output).

    ``y[n, i, j, o] = sum_{a, b, c} xp[n, i + a, j + b, c] * kernel[a, b, c, o]`` where ``xp`` is
    ``x`` zero-padded by ``padding`` (cross-correlation, as in :func:`jax.lax.conv`). Every
    formulation computes this function and its exact gradients; they differ in speed only.

    ``"canonical_vjp"`` has the backward pass, for the output gradient ``g`` (``[N, H', W', O]``),
    ``dx = conv(g, flip_hw(kernel)^T_io)`` with padding ``(k - 1 - lo, k - 1 - hi)`` per spatial
    dim, and ``dkernel = transpose(conv(x^T, g^T))`` where ``x^T`` is ``x`` as ``[C, H, W, N]``
    (channels as the batch, batch as the features) and ``g^T`` is ``g`` as an HWIO kernel
    ``[H', W', N, O]``: all three convolutions in canonical NHWC/HWIO order, which XLA:CPU runs
    on its fast kernel even inside a loop body.

    Works under ``jax.vmap`` (e.g. per-client kernels), ``lax.scan``, ``jit`` and
    ``shard_map`` (``check_vma=True``). Under ``shard_map`` a kernel that is replicated across
    devices gets the gradient summed over them, exactly as JAX's autodiff does for ``"lax"``;
    per-device (per-client) training should mark the params as varying first with
    ``jax.lax.pcast(params, axis_name, to="varying")``.

    Args:
      x: ``[N, H, W, C]`` input.
      kernel: ``[kh, kw, C, O]`` kernel.
      padding: ``"SAME"``, ``"VALID"`` or two explicit ``(low, high)`` pairs.
      formulation: ``"auto"`` (see :func:`resolve_conv`), ``"lax"``, ``"patches"`` or
        ``"canonical_vjp"``.

    Returns:
      ``[N, H', W', O]`` output (``H' = H`` for ``"SAME"``, ``H - kh + 1`` for ``"VALID"``).

    Example:
      >>> import jax.numpy as jnp
      >>> x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5))
      >>> conv2d(x, k, padding="VALID", formulation="canonical_vjp").shape
      (1, 2, 2, 5)
      >>> float(conv2d(x, k, formulation="patches")[0, 0, 0, 0])  # corner: 2 x 2 x 2 ones
      8.0
    """
    impl = _IMPLS[resolve_conv(formulation)]
    if x.ndim != 4:
        raise ValueError(f"x: expected a 4-D NHWC array, got shape {x.shape}.")
    if kernel.ndim != 4:
        raise ValueError(f"kernel: expected a 4-D HWIO array, got shape {kernel.shape}.")
    if kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"kernel: its input-channel dim {kernel.shape[2]} must equal x's channel dim "
            f"{x.shape[3]} (x is NHWC, kernel is HWIO)."
        )
    pads = _pad_pairs(padding, kernel.shape[:2])
    return impl(x, kernel, pads)

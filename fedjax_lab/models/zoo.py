"""The standard federated benchmark models, built with Flax Linen, returned as :class:`Model`.

Every factory returns a pure ``(init, apply)`` pair (:func:`fedjax_lab.models.from_flax`);
``apply(params, x, *, key=None, train=False)`` takes one batch ``[B, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.models._conv import Padding, conv2d, resolve_conv
from fedjax_lab.models._core import Model, ModelSpec, from_flax


class Conv2D(nn.Module):
    """Stride-1 2-D convolution layer (NHWC) that calls :func:`fedjax_lab.models.conv2d`.

    Params are named like ``flax.linen.Conv``: ``kernel`` ``[kh, kw, C, features]`` (LeCun
    normal) and ``bias`` ``[features]`` (zeros).

    Attributes:
      features: number of output channels.
      kernel_size: ``(kh, kw)``.
      padding: ``"SAME"``, ``"VALID"`` or two ``(low, high)`` pairs.
      use_bias: add a bias.
      conv: convolution formulation (``"auto"``, ``"lax"``, ``"patches"``, ``"canonical_vjp"``).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    padding: Padding = "SAME"
    use_bias: bool = True
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
        )
        y = conv2d(x, kernel.astype(x.dtype), padding=self.padding, formulation=self.conv)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            y = y + bias.astype(y.dtype).reshape(1, 1, 1, -1)
        return y


def _check_shape(input_shape: Sequence[int], name: str = "input_shape") -> tuple[int, ...]:
    try:
        dims = tuple(input_shape)
    except TypeError:
        raise ValueError(
            f"{name}: expected a tuple of positive sizes such as (28, 28, 1), got "
            f"{input_shape!r}."
        ) from None
    if not dims or any(_not_count(d) or d <= 0 for d in dims):
        raise ValueError(
            f"{name}: expected a non-empty tuple of positive integer sizes (no bools), got "
            f"{input_shape!r}."
        )
    return tuple(int(d) for d in dims)


def _not_count(value) -> bool:
    """``True`` for bools and anything that is not a whole number."""
    if isinstance(value, (bool, np.bool_)):
        return True
    try:
        return int(value) != value
    except (TypeError, ValueError):
        return True


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype: str | None) -> jnp.dtype | None:
    """The layers' compute dtype for a zoo model's ``dtype`` option (``None`` for float32).

    Mixed precision: parameters (the master copy every optimiser, aggregator and checkpoint
    sees) stay float32; with ``"bfloat16"`` or ``"float16"`` each layer casts its inputs and
    parameters to that dtype for its matmuls and convolutions, and the logits come back as
    float32 so the loss and its gradient are computed in float32. ``"float32"`` (the default)
    adds no cast at all, so results are exactly those of the model without the option.

    Example:
      >>> compute_dtype("bfloat16")
      dtype(bfloat16)
      >>> compute_dtype("float32") is None
      True
    """
    if dtype is None or dtype == "float32":
        return None
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype: expected one of {', '.join(map(repr, COMPUTE_DTYPES))} (the layers' compute "
            f"dtype; params stay float32), got {dtype!r}."
        )
    return jnp.dtype(dtype)


def _input_dtype(dtype: jnp.dtype | None) -> jnp.dtype:
    return jnp.dtype(jnp.float32) if dtype is None else dtype


def _f32(logits: jax.Array) -> jax.Array:
    return logits if logits.dtype == jnp.float32 else logits.astype(jnp.float32)


def _check_positive(value: int, name: str) -> int:
    if _not_count(value) or value <= 0:
        raise ValueError(
            f"{name}: must be a positive integer (an int, not a bool), got {value!r}."
        )
    return int(value)


def _check_sizes(values: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(
            f"{name}: expected a sequence of positive integers such as (64, 64), got {values!r}."
        )
    return tuple(_check_positive(v, name) for v in values)


class _MLP(nn.Module):
    hidden: tuple[int, ...]
    num_classes: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1)).astype(_input_dtype(self.dtype))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h, dtype=self.dtype)(x))
        self.sow("intermediates", "features", _f32(x))  # Model.features (MOON)
        return _f32(nn.Dense(self.num_classes, dtype=self.dtype)(x))


class _BatchNormMLP(nn.Module):
    """``_MLP`` with BatchNorm after every hidden Dense layer (before the ReLU)."""

    hidden: tuple[int, ...]
    num_classes: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        x = x.reshape((x.shape[0], -1)).astype(_input_dtype(self.dtype))
        rows = None if mask is None else jnp.reshape(mask, (-1, 1))  # real examples only
        for h in self.hidden:
            x = nn.Dense(h, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x, mask=rows)
            x = nn.relu(x)
        return _f32(nn.Dense(self.num_classes, dtype=self.dtype)(x))


def logistic_regression(
    input_shape: Sequence[int], num_classes: int, *, dtype: str = "float32"
) -> Model:
    """Multinomial logistic regression: ``logits = flatten(x) @ W + b``.

    Args:
      input_shape: shape of one example (flattened by the model).
      num_classes: number of classes.
      dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (mixed precision:
        params stay float32, see :func:`fedjax_lab.models.compute_dtype`).

    Returns:
      A :class:`Model`; ``apply`` maps ``[B, *input_shape]`` to ``[B, num_classes]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = logistic_regression((8, 8), 10)
      >>> model.apply(model.init(jax.random.key(0)), jnp.ones((5, 8, 8))).shape
      (5, 10)
    """
    shape = _check_shape(input_shape)
    num_classes = _check_positive(num_classes, "num_classes")
    module = _MLP((), num_classes, compute_dtype(dtype))
    spec = ModelSpec(input_shape=shape, num_classes=num_classes)
    return from_flax(module, jnp.zeros((1, *shape), jnp.float32), spec=spec)


def mlp(
    input_shape: Sequence[int],
    hidden: Sequence[int] = (200, 200),
    num_classes: int = 10,
    *,
    dtype: str = "float32",
    batch_norm: bool = False,
) -> Model:
    """Fully connected ReLU network on the flattened input.

    The default ``mlp((28, 28), (200, 200), 10)`` is the 784-200-200-10 "2NN" of McMahan et al.

    ``batch_norm=True`` puts a BatchNorm layer (``flax.linen.BatchNorm``, momentum 0.99,
    statistics over the real examples of each batch) between every hidden Dense layer and its
    ReLU. The model is then stateful (:attr:`fedjax_lab.models.Model.train_apply`): its params
    are ``{"params": ..., "batch_stats": ...}``, evaluation uses the running statistics; FedAvg
    averages the statistics with the weights, FedBN (:func:`fedjax_lab.algorithms.fed_bn`)
    keeps the BatchNorm layers on each client.

    Args:
      input_shape: shape of one example (flattened by the model).
      hidden: widths of the hidden layers.
      num_classes: number of classes.
      dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (mixed precision:
        params stay float32, see :func:`fedjax_lab.models.compute_dtype`).
      batch_norm: BatchNorm after every hidden layer (needs at least one hidden layer).

    Returns:
      A :class:`Model`; ``apply`` maps ``[B, *input_shape]`` to ``[B, num_classes]``.

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = mlp((4,), hidden=(8,), num_classes=3)
      >>> model.apply(model.init(jax.random.key(0)), jnp.ones((2, 4))).shape
      (2, 3)
      >>> bn = mlp((4,), hidden=(8,), num_classes=3, batch_norm=True)
      >>> variables = bn.init(jax.random.key(0))
      >>> sorted(variables), variables["batch_stats"]["BatchNorm_0"]["var"].shape
      (['batch_stats', 'params'], (8,))
    """
    shape = _check_shape(input_shape)
    hidden = _check_sizes(hidden, "hidden")
    num_classes = _check_positive(num_classes, "num_classes")
    if not isinstance(batch_norm, (bool, np.bool_)):
        raise TypeError(f"batch_norm: expected True or False, got {batch_norm!r}.")
    if batch_norm and not hidden:
        raise ValueError(
            "batch_norm: BatchNorm follows the hidden layers, and hidden=() has none; give "
            "hidden=(64,) or batch_norm=False."
        )
    mlp_class = _BatchNormMLP if batch_norm else _MLP
    module = mlp_class(hidden, num_classes, compute_dtype(dtype))
    spec = ModelSpec(input_shape=shape, num_classes=num_classes)
    return from_flax(module, jnp.zeros((1, *shape), jnp.float32), spec=spec)


class _CNN(nn.Module):
    input_shape: tuple[int, ...]
    num_classes: int
    features: tuple[int, ...]
    dense: int
    dropout: tuple[float, float]
    padding: str
    conv: str
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], *self.input_shape)).astype(_input_dtype(self.dtype))
        if x.ndim == 3:
            x = x[..., None]
        for f in self.features:
            x = nn.relu(Conv2D(f, (3, 3), padding=self.padding, conv=self.conv)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(self.dropout[0], deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout[1], deterministic=not train)(x)
        self.sow("intermediates", "features", _f32(x))  # Model.features (MOON)
        return _f32(nn.Dense(self.num_classes, dtype=self.dtype)(x))


def _dropout_pair(dropout: float | Sequence[float]) -> tuple[float, float]:
    rates = (dropout, dropout) if isinstance(dropout, int | float) else tuple(dropout)
    if len(rates) != 2 or any(not 0.0 <= float(r) < 1.0 for r in rates):
        raise ValueError(
            f"dropout: expected a rate in [0, 1) or a pair (after_pool, after_dense), got "
            f"{dropout!r}."
        )
    return float(rates[0]), float(rates[1])


def cnn(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 62,
    *,
    features: Sequence[int] = (32, 64),
    dense: int = 128,
    dropout: float | Sequence[float] = 0.0,
    padding: str = "VALID",
    conv: str = "auto",
    dtype: str = "float32",
) -> Model:
    """The EMNIST CNN of the FedAvg / Adaptive Federated Optimization papers.

    ``conv3x3(32) - relu - conv3x3(64) - relu - maxpool2x2 - dropout - dense(128) - relu -
    dropout - dense(num_classes)``, VALID padding (1.2M parameters at the defaults). Reddi et
    al. use ``dropout=(0.25, 0.5)``; the default 0.0 makes training deterministic.

    ``conv="auto"`` (the default) is ``"canonical_vjp"`` on CPU and ``"lax"`` on GPU/TPU
    (:func:`fedjax_lab.models.resolve_conv`). Measured with
    ``experiments/benchmarks/conv_formulations.py`` on a 2-core XLA:CPU machine
    (jax 0.10.2; EMNIST CNN, batch 20, 10 local SGD steps, 8 clients;
    examples/s, one shared, noisy machine)::

      formulation    python loop  scan+lax.map  unrolled+lax.map  scan+vmap
      lax                    496            37                44         19
      patches                175           526               505        506
      canonical_vjp         1004           730               711        404

    The engine's CPU context is a ``lax.scan`` over local steps under ``lax.map`` over
    clients, where ``canonical_vjp`` is 20x faster than ``lax``. On GPU, cuDNN has no such
    loop-body slow path and plain ``lax`` is the safe choice.

    Args:
      input_shape: shape of one example, ``(H, W)`` or ``(H, W, C)`` (flat inputs are reshaped).
      num_classes: number of classes (62 for EMNIST-62).
      features: channels of the 3x3 convolutions.
      dense: width of the hidden dense layer.
      dropout: rate, or ``(after_pool, after_dense)`` rates; active only with ``train=True``.
      padding: ``"VALID"`` (the papers) or ``"SAME"``.
      conv: convolution formulation, see :func:`fedjax_lab.models.conv2d`.
      dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (mixed precision:
        params stay float32, see :func:`fedjax_lab.models.compute_dtype`).
      batch_norm: BatchNorm after every hidden layer (needs at least one hidden layer).

    Returns:
      A :class:`Model`; ``apply`` maps ``[B, *input_shape]`` to ``[B, num_classes]``.

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017; Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = cnn((8, 8, 1), num_classes=5, features=(2, 3), dense=4)
      >>> model.apply(model.init(jax.random.key(0)), jnp.ones((2, 8, 8, 1))).shape
      (2, 5)
    """
    shape = _check_shape(input_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"input_shape: expected (H, W) or (H, W, C), got {input_shape}.")
    resolve_conv(conv, backend="cpu")  # validates the name early
    module = _CNN(
        input_shape=shape,
        num_classes=_check_positive(num_classes, "num_classes"),
        features=_check_sizes(features, "features"),
        dense=_check_positive(dense, "dense"),
        dropout=_dropout_pair(dropout),
        padding=padding,
        conv=conv,
        dtype=compute_dtype(dtype),
    )
    spec = ModelSpec(input_shape=shape, num_classes=module.num_classes)
    return from_flax(module, jnp.zeros((1, *shape), jnp.float32), spec=spec)


class _CharLSTM(nn.Module):
    vocab_size: int
    embed: int
    hidden: int
    num_layers: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Embed(self.vocab_size, self.embed, dtype=self.dtype)(x.astype(jnp.int32))
        for _ in range(self.num_layers):
            h = nn.RNN(nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype))(h)
        return _f32(nn.Dense(self.vocab_size, dtype=self.dtype)(h))


def char_lstm(
    vocab_size: int = 90,
    embed: int = 8,
    hidden: int = 256,
    num_layers: int = 2,
    *,
    dtype: str = "float32",
) -> Model:
    """The Shakespeare next-character LSTM (LEAF / Reddi et al.).

    ``embedding(vocab, 8) - LSTM(256) - LSTM(256) - dense(vocab)`` applied at every position;
    the recurrence is a ``lax.scan`` over time (``flax.linen.RNN``). 90 symbols is TFF's
    Shakespeare vocabulary (86 characters plus pad, OOV, BOS, EOS); use
    ``classification_loss(model, pad_id=0)`` to skip padding positions.

    Args:
      vocab_size: number of symbols (input ids and output classes).
      embed: embedding width.
      hidden: LSTM width.
      num_layers: number of stacked LSTM layers.
      dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (mixed precision:
        params stay float32, see :func:`fedjax_lab.models.compute_dtype`).

    Returns:
      A :class:`Model`; ``apply`` maps ``int[B, T]`` to logits ``[B, T, vocab_size]``.

    References:
      Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018; Reddi et al., "Adaptive
      Federated Optimization", ICLR 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = char_lstm(vocab_size=7, embed=2, hidden=4, num_layers=1)
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jnp.zeros((3, 5), jnp.int32)).shape
      (3, 5, 7)
    """
    module = _CharLSTM(
        vocab_size=_check_positive(vocab_size, "vocab_size"),
        embed=_check_positive(embed, "embed"),
        hidden=_check_positive(hidden, "hidden"),
        num_layers=_check_positive(num_layers, "num_layers"),
        dtype=compute_dtype(dtype),
    )
    v = module.vocab_size
    spec = ModelSpec(num_classes=v, input_vocab=v, sequence=True)
    return from_flax(module, jnp.zeros((1, 2), jnp.int32), spec=spec)


class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with 2-D ``query``/``key``/``value``/``out`` kernels."""

    num_heads: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        b, t, d = h.shape
        dh = d // self.num_heads

        def heads(name):  # [B, T, d] -> [B, heads, T, dh]
            y = nn.Dense(d, dtype=self.dtype, name=name)(h)
            return y.reshape(b, t, self.num_heads, dh).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bhqc,bhkc->bhqk", q, k).astype(jnp.float32) / math.sqrt(dh)
        causal = jnp.tril(jnp.ones((1, 1, t, t), bool))  # position i sees positions <= i
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bhkc->bhqc", weights, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return nn.Dense(d, dtype=self.dtype, name="out")(y)


class _TransformerBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d = h.shape[-1]
        y = nn.LayerNorm(dtype=self.dtype, name="ln_1")(h)
        h = h + _CausalSelfAttention(self.num_heads, self.dtype, name="attention")(y)
        y = nn.LayerNorm(dtype=self.dtype, name="ln_2")(h)
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="dense_in")(y))
        return h + nn.Dense(d, dtype=self.dtype, name="dense_out")(y)


class _CharTransformer(nn.Module):
    vocab_size: int
    max_len: int
    d_model: int
    num_heads: int
    num_layers: int
    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[-1]
        if t > self.max_len:
            raise ValueError(
                f"x: sequences of {t} tokens, but the model has max_len={self.max_len} learned "
                f"positions; build it with max_len >= {t}."
            )
        init = nn.initializers.normal(0.02)
        h = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, dtype=self.dtype,
                     name="embed")(x.astype(jnp.int32))
        pos = self.param("pos_embed", init, (self.max_len, self.d_model))
        h = h + pos[None, :t].astype(h.dtype)
        for i in range(self.num_layers):
            block = _TransformerBlock(self.num_heads, self.mlp_dim, self.dtype, name=f"block_{i}")
            h = block(h)
        h = nn.LayerNorm(dtype=self.dtype, name="ln_f")(h)
        return _f32(nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(h))


def char_transformer(
    vocab_size: int = 90,
    max_len: int = 80,
    d_model: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    mlp_dim: int = 256,
    *,
    dtype: str = "float32",
) -> Model:
    """A small causal (GPT-style) character transformer, same contract as :func:`char_lstm`.

    ``embedding(vocab, d_model) + learned positions[max_len]``, then ``num_layers`` pre-LN
    blocks ``h <- h + Attn(LN(h))``, ``h <- h + MLP(LN(h))`` (``MLP = dense_out(gelu(
    dense_in(.)))``, hidden ``mlp_dim``), a final LayerNorm and ``dense(vocab)`` at every
    position. Attention is causal: position ``i`` attends to positions ``<= i`` only, so the
    logits at ``i`` depend on ``x[:i+1]`` alone and the model predicts the next token at
    every position (``y[t] = x[t+1]``, the Shakespeare windows' layout). Padding only ever
    follows the real tokens of a window, so a real position never attends to it; use
    ``classification_loss(model, pad_id=0)`` so padded targets do not count.

    The Dense layers are named for targeting (``fl.models.lora_mask``):
    ``block_<i>/attention/{query,key,value,out}``, ``block_<i>/{dense_in,dense_out}``,
    ``head``; every kernel is 2-D ``[d_in, d_out]``. Embeddings are ``N(0, 0.02²)``.

    Args:
      vocab_size: number of symbols (input ids and output classes).
      max_len: number of learned positions: the longest sequence the model reads.
      d_model: width of the residual stream (a multiple of ``num_heads``).
      num_heads: attention heads (each ``d_model / num_heads`` wide).
      num_layers: transformer blocks.
      mlp_dim: hidden width of each block's MLP.
      dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (mixed precision:
        params stay float32, attention logits and softmax in float32, see
        :func:`fedjax_lab.models.compute_dtype`).

    Returns:
      A :class:`Model`; ``apply`` maps ``int[B, T]`` (``T <= max_len``) to logits
      ``[B, T, vocab_size]``.

    References:
      Vaswani et al., "Attention Is All You Need", NeurIPS 2017; Radford et al., "Language
      Models are Unsupervised Multitask Learners" (GPT-2, pre-LN blocks), 2019.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = char_transformer(vocab_size=7, max_len=5, d_model=8, num_heads=2,
      ...                          num_layers=1, mlp_dim=16)
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jnp.zeros((3, 5), jnp.int32)).shape
      (3, 5, 7)
      >>> params["block_0"]["attention"]["query"]["kernel"].shape
      (8, 8)
    """
    d_model = _check_positive(d_model, "d_model")
    num_heads = _check_positive(num_heads, "num_heads")
    if d_model % num_heads:
        raise ValueError(
            f"num_heads: must divide d_model={d_model} (each head is d_model / num_heads "
            f"wide), got {num_heads}."
        )
    module = _CharTransformer(
        vocab_size=_check_positive(vocab_size, "vocab_size"),
        max_len=_check_positive(max_len, "max_len"),
        d_model=d_model,
        num_heads=num_heads,
        num_layers=_check_positive(num_layers, "num_layers"),
        mlp_dim=_check_positive(mlp_dim, "mlp_dim"),
        dtype=compute_dtype(dtype),
    )
    v = module.vocab_size
    spec = ModelSpec(num_classes=v, input_vocab=v, sequence=True)
    return from_flax(module, jnp.zeros((1, module.max_len), jnp.int32), spec=spec)


class _ResBlock(nn.Module):
    features: int
    groups: int
    downsample: bool
    conv: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample:
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        y = Conv2D(self.features, use_bias=False, conv=self.conv)(x)
        y = nn.relu(nn.GroupNorm(num_groups=self.groups)(y))
        y = Conv2D(self.features, use_bias=False, conv=self.conv)(y)
        y = nn.GroupNorm(num_groups=self.groups)(y)
        if x.shape[-1] != self.features:  # 1x1 projection: a dense layer over channels
            x = nn.Dense(self.features, use_bias=False, name="shortcut")(x)
        return nn.relu(x + y)


class _ResNet(nn.Module):
    input_shape: tuple[int, ...]
    num_classes: int
    stage_sizes: tuple[int, ...]
    width: int
    groups: int
    conv: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], *self.input_shape)).astype(jnp.float32)
        x = Conv2D(self.width, use_bias=False, conv=self.conv)(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                x = _ResBlock(self.width * 2**i, self.groups, i > 0 and j == 0, self.conv)(x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)  # Model.features (MOON)
        return nn.Dense(self.num_classes)(x)


def resnet(
    num_classes: int = 100,
    *,
    input_shape: Sequence[int] = (32, 32, 3),
    stage_sizes: Sequence[int] = (1, 1, 1),
    width: int = 16,
    groups: int = 2,
    conv: str = "auto",
) -> Model:
    """A small CIFAR ResNet with GroupNorm instead of BatchNorm (no cross-client batch stats).

    Stem ``conv3x3(width) - GN - relu``, then stages ``i = 0, 1, ...`` of ``stage_sizes[i]``
    basic blocks with ``width * 2**i`` channels (``conv3x3 - GN - relu - conv3x3 - GN`` plus
    the shortcut, then relu), global average pooling and a dense layer. Stages after the
    first halve the resolution with a 2x2 average pool at their entry (all convolutions are
    stride 1, see :func:`fedjax_lab.models.conv2d`); a 1x1 projection matches channels on the
    shortcut. GroupNorm with 2 groups follows Hsieh et al. / Reddi et al.'s CIFAR ResNet.

    ``conv="auto"`` (the default) is ``"canonical_vjp"`` on CPU and ``"lax"`` on GPU/TPU, for
    the reasons and measurements given in :func:`cnn`.

    Args:
      num_classes: number of classes (100 for CIFAR-100).
      input_shape: shape of one example ``(H, W, C)``.
      stage_sizes: number of blocks in each stage.
      width: channels of the first stage (doubled each stage).
      groups: GroupNorm groups; must divide every stage's width.
      conv: convolution formulation, see :func:`fedjax_lab.models.conv2d`.

    Returns:
      A :class:`Model`; ``apply`` maps ``[B, H, W, C]`` to ``[B, num_classes]``.

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Hsieh et al., "The
      Non-IID Data Quagmire of Decentralized Machine Learning", ICML 2020; Reddi et al.,
      "Adaptive Federated Optimization", ICLR 2021.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = resnet(10, input_shape=(8, 8, 3), stage_sizes=(1, 1), width=4, groups=2)
      >>> model.apply(model.init(jax.random.key(0)), jnp.ones((2, 8, 8, 3))).shape
      (2, 10)
    """
    shape = _check_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape: expected (H, W, C), got {input_shape}.")
    stages = _check_sizes(stage_sizes, "stage_sizes")
    if not stages:
        raise ValueError("stage_sizes: need at least one stage, got an empty sequence.")
    width = _check_positive(width, "width")
    groups = _check_positive(groups, "groups")
    if width % groups:
        raise ValueError(f"groups: must divide width={width}, got {groups}.")
    if min(shape[:2]) < 2 ** (len(stages) - 1):
        raise ValueError(
            f"input_shape: {shape[:2]} is too small for {len(stages)} stages (each after the "
            "first halves the resolution)."
        )
    resolve_conv(conv, backend="cpu")
    num_classes = _check_positive(num_classes, "num_classes")
    module = _ResNet(shape, num_classes, stages, width, groups, conv)
    spec = ModelSpec(input_shape=shape, num_classes=num_classes)
    return from_flax(module, jnp.zeros((1, *shape), jnp.float32), spec=spec)


def num_params(params) -> int:
    """Number of scalars in a params pytree.

    Example:
      >>> import jax
      >>> num_params(mlp((784,)).init(jax.random.key(0)))  # the FedAvg 2NN
      199210
    """
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))

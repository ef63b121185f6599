"""Models as pure ``(init, apply)`` pairs: Flax adapters, the benchmark zoo, losses, convolutions,
low-rank adapters (LoRA).

A :class:`Model` is ``init(key) -> params`` and ``apply(params, x, *, key=None, train=False)``
for ONE batch ``x`` ``[B, ...]``; the engine sees only the params pytree. A model with BatchNorm
is stateful: its params are ``{"params": ..., "batch_stats": ...}`` and ``Model.train_apply``
returns the updated statistics, which local training threads through its steps.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import fedjax_lab.models as fm
  >>> model = fm.mlp((4,), hidden=(8,), num_classes=3)
  >>> params = model.init(jax.random.key(0))
  >>> batch = {"x": jnp.ones((2, 4)), "y": jnp.array([0, 1]), "mask": jnp.ones(2)}
  >>> loss = fm.classification_loss(model)(params, batch, jax.random.key(1))
  >>> loss.shape
  ()
"""

from fedjax_lab.models._conv import CONV_FORMULATIONS, conv2d, resolve_conv
from fedjax_lab.models._core import (
    Model,
    ModelSpec,
    check_data,
    classification_loss,
    classification_metrics,
    from_flax,
    from_nnx,
)
from fedjax_lab.models.lora import lora_init, lora_mask, lora_merge, lora_model, lora_scale
from fedjax_lab.models.text import word_lstm
from fedjax_lab.models.zoo import (
    COMPUTE_DTYPES,
    Conv2D,
    char_lstm,
    char_transformer,
    cnn,
    compute_dtype,
    logistic_regression,
    mlp,
    num_params,
    resnet,
)

__all__ = [
    "COMPUTE_DTYPES",
    "CONV_FORMULATIONS",
    "Conv2D",
    "Model",
    "ModelSpec",
    "char_lstm",
    "char_transformer",
    "check_data",
    "classification_loss",
    "classification_metrics",
    "cnn",
    "compute_dtype",
    "conv2d",
    "from_flax",
    "from_nnx",
    "logistic_regression",
    "lora_init",
    "lora_mask",
    "lora_merge",
    "lora_model",
    "lora_scale",
    "mlp",
    "num_params",
    "resnet",
    "word_lstm",
    "resolve_conv",
]

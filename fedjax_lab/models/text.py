"""Word-level language models: the Stack Overflow next-word LSTM of Reddi et al. (2021)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models._core import Model, ModelSpec, from_flax
from fedjax_lab.models.zoo import _check_positive

__all__ = ["word_lstm"]


class _WordLSTM(nn.Module):
    vocab_size: int
    embed: int
    hidden: int
    num_layers: int
    dense: int | None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Embed(self.vocab_size, self.embed)(x.astype(jnp.int32))
        for _ in range(self.num_layers):
            h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(h)
        if self.dense is not None:
            h = nn.Dense(self.dense)(h)  # linear projection, no activation (as TFF's model)
        return nn.Dense(self.vocab_size)(h)


def _positive(value: int, name: str) -> int:
    return _check_positive(value, name)


def word_lstm(
    vocab_size: int = 10004,
    embed: int = 96,
    hidden: int = 670,
    num_layers: int = 1,
    *,
    dense: int | None = 96,
) -> Model:
    """The Stack Overflow next-word LSTM of Reddi et al. (TFF's ``stackoverflow_word`` model).

    ``embedding(vocab_size, 96) - LSTM(670) - dense(96) - dense(vocab_size)`` at every
    position; the recurrence is a ``lax.scan`` over time (``flax.linen.RNN``), the 96-wide
    dense layer is a linear projection (no activation). ``vocab_size = 10,000 + 4``: TFF's
    layout of :func:`fedjax_lab.data.datasets.stackoverflow_vocab` (pad 0, 10,000 words, one
    OOV bucket, BOS, EOS); at the defaults the model has 4,050,748 parameters. Use
    ``classification_loss(model, pad_id=0)`` so padded positions do not count.

    Padding only ever follows the real words of a window, so the LSTM state of a real
    position never sees padding (Keras' ``mask_zero`` changes nothing there).

    Args:
      vocab_size: number of symbols, words plus the 4 specials (input ids and output classes).
      embed: embedding width (96).
      hidden: LSTM width (670).
      num_layers: number of stacked LSTM layers (1).
      dense: width of the linear projection before the output layer (96); ``None`` skips it.

    Returns:
      A :class:`~fedjax_lab.models.Model`; ``apply`` maps ``int[B, T]`` to logits
      ``[B, T, vocab_size]``.

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (the Stack Overflow
      next-word-prediction model of its appendix); Hochreiter & Schmidhuber, "Long
      Short-Term Memory", 1997.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fedjax_lab.models.text import word_lstm
      >>> model = word_lstm(vocab_size=9, embed=4, hidden=6, dense=3)
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 9)
    """
    module = _WordLSTM(
        vocab_size=_positive(vocab_size, "vocab_size"),
        embed=_positive(embed, "embed"),
        hidden=_positive(hidden, "hidden"),
        num_layers=_positive(num_layers, "num_layers"),
        dense=None if dense is None else _positive(dense, "dense"),
    )
    v = module.vocab_size
    spec = ModelSpec(num_classes=v, input_vocab=v, sequence=True)
    return from_flax(module, jnp.zeros((1, 2), jnp.int32), spec=spec)

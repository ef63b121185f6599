"""Federated LoRA: clients train and send low-rank adapters only; the base model is frozen.

FedIT (Zhang et al. 2024) runs FedAvg over LoRA adapters (Hu et al. 2021): the server and every
client share the frozen base ``W0``; each targeted kernel carries factors ``A`` ``[d_in, r]``,
``B`` ``[r, d_out]`` and the model runs with ``W = W0 + s · A @ B`` (``s = alpha / r``, see
:func:`fedjax_lab.models.lora_merge`). Clients train ``(A, B)`` alone and send their delta; the
server feeds the weighted mean of the deltas to its optimiser, which therefore moves the
adapters only (FedAvg: ``fed_sgd(1.0)``, the means of ``A`` and ``B``; FedAdam:
``fl.server.fed_adam``).

Averaging the factors separately is not averaging the models:
``mean_i(A_i B_i) != mean_i(A_i) mean_i(B_i)``. FedEx-LoRA (Singhal et al. 2024) folds the
difference, a server-side quantity, into the frozen base each round (``aggregation="exact"``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import aggregators as aggregators_lib
from fedjax_lab import compression as compression_lib
from fedjax_lab import kit
from fedjax_lab._types import (
    ClientInput,
    ClientOutput,
    FederatedAlgorithm,
    LossFn,
    Params,
    PRNGKey,
    PyTree,
    ServerState,
)
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.partial import merge, split
from fedjax_lab.models.lora import lora_init, lora_mask, lora_merge, lora_scale

__all__ = ["AGGREGATIONS", "LoRAState", "fed_lora", "lora_uplink_bits"]

AGGREGATIONS = ("separate", "exact")
"""The aggregation rules of :func:`fed_lora`: FedIT's ``"separate"`` means of ``A`` and ``B``,
FedEx-LoRA's ``"exact"`` (the residual folded into the base)."""


class LoRAState(NamedTuple):
    """``ServerState.extra`` of :func:`fed_lora`.

    Attributes:
      base: the base kernels ``W0`` of the targeted leaves (flatten order). Frozen with
        ``aggregation="separate"``; moved by the residual with ``"exact"``. The other leaves of
        the base are the non-targeted leaves of ``ServerState.params``, which never change.
      adapters: ``({"a": A, "b": B}, ...)``, one pair per targeted leaf.
    """

    base: tuple[jax.Array, ...]
    adapters: tuple[dict[str, jax.Array], ...]


def _frozen(params: Params, target: str | None) -> PyTree:
    """``True`` for the leaves without an adapter (``partial.split``'s "global" side)."""
    return jax.tree.map(lambda m: not m, lora_mask(params, target))


def lora_uplink_bits(params: Params, *, rank: int, target: str | None = None) -> dict[str, float]:
    """Bits one client sends a round: its adapter delta vs the full model delta (32 bits an entry).

    The convention of :mod:`fedjax_lab.compression` (``identity().bits``): every float costs 32
    bits. LoRA sends ``Σ_k r (d_in,k + d_out,k)`` numbers over the targeted kernels ``k``;
    full fine-tuning (FedAvg) sends every parameter. The same figure is each round's
    ``bits_sent`` metric of :func:`fed_lora`, summed over the clients that took part.

    Args:
      params: the base model's params (shapes only are read).
      rank: adapter rank ``r``.
      target: regular expression over leaf paths (see :func:`fedjax_lab.models.lora_mask`).

    Returns:
      ``{"lora_bits", "full_bits", "ratio"}`` (``ratio = lora_bits / full_bits``).

    Example:
      >>> import jax.numpy as jnp
      >>> bits = lora_uplink_bits({"w": jnp.zeros((64, 64)), "b": jnp.zeros(64)}, rank=4)
      >>> bits["lora_bits"], bits["full_bits"], round(bits["ratio"], 4)
      (16384, 133120, 0.1231)
    """
    adapters = jax.eval_shape(lambda p: lora_init(p, jax.random.key(0), rank=rank,
                                                  target=target), params)
    bits = compression_lib.identity().bits
    lora, full = bits(adapters), bits(params)
    return {"lora_bits": lora, "full_bits": full, "ratio": lora / full}


@register("fedlora")
def fed_lora(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    rank: int = 4,
    alpha: float | None = None,
    target: str | None = None,
    aggregation: str = "separate",
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    seed: int = 0,
    unroll: int | bool = 1,
    name: str = "fedlora",
) -> FederatedAlgorithm:
    """Federated LoRA (FedIT; FedEx-LoRA with ``aggregation="exact"``) over a frozen base.

    Update rule (round ``t``; base kernels ``W0``, server adapters ``(A, B)`` per targeted
    kernel, ``s = alpha / r``, cohort weights ``p_i = w_i / Σ_j w_j``):

    * client ``i`` trains ``(A_i, B_i)`` from ``(A, B)`` with ``client_optimizer`` on
      ``loss_fn(W0 + s A_i B_i, ...)`` (every other leaf frozen) and sends only
      ``(ΔA_i, ΔB_i) = (A - A_i, B - B_i)``;
    * server: ``g = (Σ p_i ΔA_i, Σ p_i ΔB_i)``, ``(A, B) <- (A, B) + server_optimizer(g)``
      (the optimiser's state covers the adapters only). With FedAvg (``fed_sgd(1)``, the
      default) ``A = Σ p_i A_i``, ``B = Σ p_i B_i``;
    * ``"separate"`` (FedIT): ``W0`` never changes (bit for bit);
    * ``"exact"`` (FedEx-LoRA): ``W0 <- W0 + s R`` with the residual
      ``R = Σ p_i A_i B_i - (Σ p_i A_i)(Σ p_i B_i)``, computed from the deltas as
      ``R = Σ p_i ΔA_i ΔB_i - (Σ p_i ΔA_i)(Σ p_i ΔB_i)`` (no cancellation of large terms).
      With FedAvg the new global model is then exactly the average of the client models,
      ``W0 + s A B = Σ p_i (W0 + s A_i B_i)``. With another server optimiser the adapters
      take its step and the base still gets ``s R``. This is the one case where the base
      moves.

    ``state.params`` is the global model in the base model's own tree (``W0 + s A B`` at the
    targeted kernels): evaluate and checkpoint it as any model's params.
    ``state.extra`` is a :class:`LoRAState`.

    Communication: a client's uplink is its adapter delta alone, ``32 Σ_k r (d_in + d_out)``
    bits (:func:`lora_uplink_bits`, reported as the round metric ``bits_sent``, summed over the
    cohort), the same for both rules. ``R`` is computed by the server from the received
    ``(ΔA_i, ΔB_i)`` (in the simulation, inside the aggregator's per-client ``prepare``); it is
    never sent up, but it needs each client's factors (not only their sum: no secure
    aggregation), and the next round's downlink carries the moved base kernels
    (``d_in × d_out`` each, full rank) besides ``(A, B)``.

    The client update is the adapter delta, not a params-shaped delta
    (``update_is_delta=False``): :func:`~fedjax_lab.algorithms.with_compression` without error
    feedback applies, the params-shaped wrappers (other aggregators, DP) refuse it.

    Args:
      loss_fn: mean loss over real examples, of the base model's params.
      client_optimizer: optax client optimiser (default ``optax.sgd(0.1)``), on the adapters.
      rank: adapter rank ``r >= 1``.
      alpha: scale numerator, ``s = alpha / r`` (``None``: ``alpha = r``, ``s = 1``).
      target: regular expression over leaf paths selecting the adapted 2-D kernels (see
        :func:`fedjax_lab.models.lora_mask`; e.g. ``"attention|dense"`` for the attention and
        MLP kernels of :func:`fedjax_lab.models.char_transformer`); ``None``: every 2-D weight.
      aggregation: ``"separate"`` (FedIT) or ``"exact"`` (FedEx-LoRA), see above.
      server_optimizer: the server optimiser on the mean adapter delta (default
        ``fl.server.fed_sgd(server_learning_rate)``); e.g. ``fl.server.fed_adam(1e-2)``.
      server_learning_rate: ``η`` of the default FedSGD server (1.0: averaging).
      seed: seed of the ``A`` factors' initialisation (``jax.random.key(seed)``).
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`. ``alg.init(params)`` takes the base params
      (pretrained or not) and raises ``ValueError`` when ``target`` matches no 2-D weight.

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
      (arXiv:2106.09685, 2021); Zhang et al., "Towards Building the Federated GPT: Federated
      Instruction Tuning" (FedIT), ICASSP 2024; Singhal, Ponkshe & Vepakomma, "FedEx-LoRA:
      Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
      arXiv:2410.09432, 2024.

    Example:
      >>> import jax, jax.numpy as jnp, fedjax_lab as fl
      >>> model = fl.models.mlp((4,), hidden=(8,), num_classes=3)
      >>> alg = fed_lora(fl.models.classification_loss(model), rank=2, target="Dense_0")
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> [(ad["a"].shape, ad["b"].shape) for ad in state.extra.adapters]
      [((4, 2), (2, 8))]
    """
    kit.check_loss_fn(loss_fn)
    s = lora_scale(rank, alpha)  # checks rank and alpha
    if target is not None:  # matched against the params in init
        try:
            re.compile(target)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"target: {target!r} is not a regular expression over leaf paths ({e}); give "
                "e.g. 'attention|dense', or None for every 2-D weight."
            ) from e
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation: expected 'separate' (FedIT: mean of A and mean of B) or 'exact' "
            f"(FedEx-LoRA: plus the residual folded into the base), got {aggregation!r}."
        )
    seed = kit.check_count("seed", seed, 0)
    exact = aggregation == "exact"
    client_optimizer = kit.client_optimizer(client_optimizer)
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    mean = aggregators_lib.weighted_mean()

    def prepare(update: PyTree, weight: jax.Array, agg_state: PyTree) -> PyTree:
        products = tuple(d["a"] @ d["b"] for d in update) if exact else ()
        return mean.prepare((update, products), weight, agg_state)

    aggregator = mean._replace(prepare=prepare)

    def effective(params: Params, base: tuple, adapters: tuple) -> Params:
        """The model ``W0 + s A B``: ``params`` with its targeted kernels rebuilt."""
        with_base = merge(params, base, _frozen(params, target))
        return lora_merge(with_base, adapters, rank=rank, alpha=alpha, target=target)

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        kit.check_num_clients(num_clients)
        base = tuple(split(params, _frozen(params, target))[1])
        adapters = lora_init(params, jax.random.key(seed), rank=rank, target=target)
        state = kit.server_state(params, None, aggregator, extra=LoRAState(base, adapters))
        return state._replace(opt_state=server_optimizer.init(adapters))

    bits = compression_lib.identity().bits

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        lora = state.extra

        def adapter_loss(adapters, batch, k):
            return loss_fn(effective(state.params, lora.base, adapters), batch, k)

        train = kit.local_training(adapter_loss, client_optimizer, unroll=unroll)
        result = train(lora.adapters, client.batches, key)
        delta = kit.client_delta(lora.adapters, result.params)
        metrics = dict(result.metrics)
        took_part = (jnp.asarray(client.weight) > 0).astype(jnp.float32)
        metrics["bits_sent"] = took_part * bits(delta)
        return ClientOutput(delta, client.weight, metrics, ())

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        (delta, products), lora = aggregate, state.extra
        updates, opt_state = server_optimizer.update(delta, state.opt_state, lora.adapters)
        adapters = optax.apply_updates(lora.adapters, updates)
        base = lora.base
        if exact:  # W0 <- W0 + s (Σ p ΔA ΔB - (Σ p ΔA)(Σ p ΔB))
            base = tuple(w + (s * (p - d["a"] @ d["b"])).astype(w.dtype)
                         for w, p, d in zip(base, products, delta, strict=True))
        return state._replace(params=effective(state.params, base, adapters),
                              opt_state=opt_state, extra=LoRAState(base, adapters))

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              update_is_delta=False, check_data=kit.data_check(loss_fn))

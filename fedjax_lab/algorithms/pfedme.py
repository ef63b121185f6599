"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020): personalisation with Moreau envelopes."""

from __future__ import annotations

import jax
import optax

from fedjax_lab import aggregators as aggregators_lib
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

__all__ = ["personal_params", "pfedme"]


def personal_params(state: ServerState) -> PyTree:
    """pFedMe's personalised models ``θ_i`` (the last inner solution), leaves ``[N, ...]``."""
    return state.client_states


@register("pfedme")
def pfedme(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    *,
    lam: float = 15.0,
    inner_steps: int = 5,
    personal_learning_rate: float = 0.09,
    server_optimizer: optax.GradientTransformation | None = None,
    server_learning_rate: float = 1.0,
    unroll: int | bool = 1,
    name: str = "pfedme",
) -> FederatedAlgorithm:
    """pFedMe: bi-level personalised FL; clients follow the gradient of their Moreau envelope.

    Client ``i`` minimises ``F_i(w) = min_θ f_i(θ) + (λ/2) ||θ - w||²`` (the Moreau envelope of
    its loss). Update rule (round ``t``; client ``i`` starts from ``w = w_t``; for each of its
    local batches ``D``):

    * inner problem: ``θ ≈ argmin_θ f_i(θ; D) + (λ/2) ||θ - w||²`` by ``K`` steps of gradient
      descent from ``θ = w`` with learning rate ``personal_learning_rate``:
      ``θ <- θ - lr_p (∇f_i(θ; D) + λ (θ - w))``;
    * outer local update: ``∇F_i(w) = λ (w - θ)`` fed to ``client_optimizer``; with SGD of rate
      ``η``: ``w <- w - η λ (w - θ)``;
    * server: ``w_{t+1} = (1 - β) w_t + β Σ p_i w_i = w_t - β Σ p_i (w_t - w_i)``
      (``p_i ∝`` cohort weight; ``weighting="uniform"`` gives the paper's plain mean).

    The last ``θ`` of a client is its personalised model, kept in ``state.client_states``
    (a client without real data this round keeps its old one). An all-padding batch changes
    nothing.

    Args:
      loss_fn: mean loss over real examples.
      client_optimizer: outer optimiser (default ``optax.sgd(0.005)``, the paper's ``η``; note
        this differs from the library-wide ``sgd(0.1)`` because ``η λ`` should stay below 1).
      lam: ``λ > 0`` (paper: 15).
      inner_steps: ``K >= 1`` inner steps (paper: 5).
      personal_learning_rate: inner step size (paper: 0.09).
      server_optimizer: the server optimiser on the mean delta (default
        ``fl.server.fed_sgd(server_learning_rate)``).
      server_learning_rate: the paper's server mixing ``β`` (paper: 1 or 2):
        ``w <- (1 - β) w + β Σ p_i w_i``.
      unroll: ``lax.scan`` unroll of the local steps.
      name: a label for logs and tables.

    Returns:
      A :class:`~fedjax_lab.FederatedAlgorithm`; needs ``alg.init(params, num_clients=N)``.

    References:
      Dinh, Tran & Nguyen, "Personalized Federated Learning with Moreau Envelopes",
      NeurIPS 2020, Algorithm 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from fedjax_lab.algorithms.pfedme import pfedme
      >>> alg = pfedme(lambda p, b, k: jnp.sum(p ** 2))
      >>> alg.init(jnp.zeros(3), num_clients=4).client_states.shape
      (4, 3)
    """
    kit.check_loss_fn(loss_fn)
    kit.check_positive("lam", lam, hint=" (λ; the paper uses 15)")
    kit.check_count("inner_steps", inner_steps)
    kit.check_positive("personal_learning_rate", personal_learning_rate,
                       hint=" (the paper uses 0.09)")
    client_optimizer = (
        optax.sgd(0.005) if client_optimizer is None else kit.client_optimizer(client_optimizer)
    )
    server_optimizer = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = aggregators_lib.weighted_mean()

    def inner(w, batch, key):
        def objective(theta):
            diff = optax.tree.sub(theta, w)
            return loss_fn(theta, batch, key) + 0.5 * lam * optax.tree.vdot(diff, diff)

        def body(theta, _):
            g = jax.grad(objective)(theta)
            return optax.tree.add_scale(theta, -personal_learning_rate, g), None

        return jax.lax.scan(body, w, None, length=inner_steps)[0]

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = kit.check_num_clients(num_clients)
        personal = () if n is None else kit.copies_per_client(params, n)
        return kit.server_state(params, server_optimizer, aggregator, client_states=personal)

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        kit.require_client_state(client.state, name)

        def step(w, carry, batch, k):  # carry: (outer optimiser state, θ_i)
            opt_state, _ = carry
            loss = loss_fn(w, batch, k)
            theta = inner(w, batch, k)
            grad = optax.tree.scale(lam, optax.tree.sub(w, theta))
            updates, opt_state = client_optimizer.update(grad, opt_state, w)
            return optax.apply_updates(w, updates), (opt_state, theta), loss, ()

        w0 = state.params
        result = kit.local_loop(step, w0, (client_optimizer.init(w0), client.state),
                                client.batches, key, unroll=unroll)
        theta = result.opt_state[1]
        return ClientOutput(kit.client_delta(w0, result.params), client.weight, result.metrics,
                            theta)

    server_update = kit.server_step(server_optimizer)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                              check_data=kit.data_check(loss_fn))

"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020): personalisation with Moreau envelopes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_lab import server as server_lib
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
from fedjax_lab.aggregators import weighted_mean
from fedjax_lab.algorithms._registry import register
from fedjax_lab.algorithms.fedau import check_num_clients, require_client_state
from fedjax_lab.algorithms.fedavg import _client_optimizer
from fedjax_lab.personalization import stack_clients

__all__ = ["personal_params", "pfedme"]


def personal_params(state: ServerState) -> PyTree:
    """pFedMe's personalised models ``θ_i`` (the last inner solution), leaves ``[N, ...]``."""
    return state.client_states


@register("pfedme")
def pfedme(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation | None = None,
    lam: float = 15.0,
    inner_steps: int = 5,
    personal_learning_rate: float = 0.09,
    beta: float = 1.0,
    *,
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
      beta: server mixing ``β`` (paper: 1 or 2).
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
    if not lam > 0:
        raise ValueError(f"lam: λ must be > 0 (paper: 15), got {lam!r}.")
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(f"inner_steps: K must be a whole number >= 1, got {inner_steps!r}.")
    if not personal_learning_rate > 0:
        raise ValueError(
            f"personal_learning_rate: must be > 0 (paper: 0.09), got {personal_learning_rate!r}."
        )
    client_optimizer = (
        optax.sgd(0.005) if client_optimizer is None else _client_optimizer(client_optimizer)
    )
    server_optimizer = server_lib.fed_sgd(beta)
    aggregator = weighted_mean()

    def inner(w, batch, key):
        def objective(theta):
            diff = optax.tree.sub(theta, w)
            return loss_fn(theta, batch, key) + 0.5 * lam * optax.tree.vdot(diff, diff)

        def body(theta, _):
            g = jax.grad(objective)(theta)
            return optax.tree.add_scale(theta, -personal_learning_rate, g), None

        return jax.lax.scan(body, w, None, length=inner_steps)[0]

    def init(params: Params, num_clients: int | None = None) -> ServerState:
        n = check_num_clients(num_clients)
        return ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
            client_states=() if n is None else stack_clients(params, n),
        )

    def client_update(state: ServerState, client: ClientInput, key: PRNGKey) -> ClientOutput:
        require_client_state(client.state, name)
        batches = client.batches
        num_steps = batches["mask"].shape[0]

        def step(carry, xs):
            w, opt_state, theta = carry
            batch, k = xs
            count = jnp.sum(batch["mask"])

            def apply(args):
                w, opt_state, theta = args
                loss = loss_fn(w, batch, k)
                theta = inner(w, batch, k)
                grad = optax.tree.scale(lam, optax.tree.sub(w, theta))
                updates, opt_state = client_optimizer.update(grad, opt_state, w)
                return optax.apply_updates(w, updates), opt_state, theta, loss

            def skip(args):
                w, opt_state, theta = args
                return w, opt_state, theta, 0.0 * count

            w, opt_state, theta, loss = jax.lax.cond(
                count > 0, apply, skip, (w, opt_state, theta)
            )
            return (w, opt_state, theta), (loss.astype(jnp.float32) * count, count)

        w0 = state.params
        (w, _, theta), (loss_sums, counts) = jax.lax.scan(
            step,
            (w0, client_optimizer.init(w0), client.state),
            (batches, jax.random.split(key, num_steps)),
            unroll=unroll,
        )
        metrics = {
            "loss_sum": jnp.sum(loss_sums),
            "num_examples": jnp.sum(counts),
            "num_steps": jnp.sum(counts > 0).astype(jnp.float32),
        }
        return ClientOutput(optax.tree.sub(w0, w), client.weight, metrics, theta)

    def server_update(state: ServerState, aggregate: PyTree, key: PRNGKey) -> ServerState:
        del key
        updates, opt_state = server_optimizer.update(aggregate, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state)

    return FederatedAlgorithm(init, client_update, aggregator, server_update, name)

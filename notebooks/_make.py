"""Generates the tutorial notebooks from the cell lists below (run: ``python notebooks/_make.py``).

The ``.ipynb`` files are written WITHOUT outputs and with stable cell ids, so a regenerated
notebook differs from the committed one only where a cell changed. Edit the cells here, not in
Jupyter; ``tests/test_notebooks.py`` checks that the committed files match this script and runs
every notebook with ``FEDJAX_LAB_SMOKE=1`` (tiny settings).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent

# The install source of the Colab cell and the badges: pyproject's [project.urls] Repository.
REPO_URL = tomllib.loads((HERE.parent / "pyproject.toml").read_text())["project"]["urls"][
    "Repository"
].rstrip("/")
GITHUB_PATH = REPO_URL.removeprefix("https://github.com/")

INSTALL = f'''\
try:
    import fedjax_lab  # noqa: F401
except ImportError:  # on Colab
    %pip install -q "fedjax_lab[datasets] @ git+{REPO_URL}"'''


def md(text: str) -> tuple[str, str]:
    return "markdown", text.strip("\n")


def code(text: str) -> tuple[str, str]:
    return "code", text.strip("\n")


def colab_badge(name: str) -> str:
    return (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{GITHUB_PATH}/blob/main/notebooks/"
        f"{name}.ipynb)"
    )


# ------------------------------------------------------------------------------ 01 quickstart

QUICKSTART = [
    md(f"""
# fedjax_lab quickstart: FedAvg vs FedAdam on federated digits

{colab_badge("01_quickstart")}

We split scikit-learn's handwritten digits over 100 clients with label skew, train a small MLP
with FedAvg and with FedAdam, and look at test accuracy, training loss and how accuracy is spread
over the clients. Each run of many rounds is ONE compiled program (a `lax.scan` over rounds),
so there is no Python loop over rounds or clients.
"""),
    md("Install the library when it is missing (on Colab). Nothing else is downloaded."),
    code(INSTALL),
    md("""
Settings. The test suite sets `FEDJAX_LAB_SMOKE=1` to run this notebook in seconds; leave it
unset for the real run (300 rounds take well under a minute on a Colab CPU).
"""),
    code("""
import os

SMOKE = bool(os.environ.get("FEDJAX_LAB_SMOKE"))
ROUNDS = 20 if SMOKE else 300
EVAL_EVERY = 5 if SMOKE else 25
print(f"{ROUNDS} rounds, evaluation every {EVAL_EVERY}")
"""),
    code("""
import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import fedjax_lab as fl

print("jax", jax.__version__, "on", jax.default_backend(), jax.devices())
"""),
    md("""
## Data

`fl.datasets.load("digits", ...)` returns `(train, test)`: two `fl.FederatedData` holding the
same 100 clients. Client `i` of `test` holds the held-out examples of client `i` of `train`.
`partition="dirichlet"` with `alpha=0.5` gives every client a skewed mix of labels (smaller
alpha, stronger skew). Every example is stored once in a flat array plus client offsets, so
clients of different sizes cost no padding.
"""),
    code("""
train, test = fl.datasets.load("digits", num_clients=100, partition="dirichlet", alpha=0.5)
print(train.describe())
print()
print(test.describe())
"""),
    md("""
## Model, loss and metrics

A model is a pair of pure functions, `init(key) -> params` and `apply(params, x)`. The loss is
the masked mean cross-entropy `loss_fn(params, batch, key)`: padded examples
(`batch["mask"] == 0`) count for nothing. `eval_fn` returns sums (loss, correct, examples), so
results of batches and clients add up exactly.
"""),
    code("""
model = fl.models.mlp((8, 8, 1), hidden=(64,), num_classes=10)
loss = fl.models.classification_loss(model)
eval_fn = fl.models.classification_metrics(model)
params = model.init(jax.random.key(0))
print(jax.tree.map(np.shape, params))
"""),
    md("""
## Two algorithms

An algorithm is a `fl.FederatedAlgorithm`: a bundle of pure functions (`init`, `client_update`,
`aggregator`, `server_update`). Both algorithms below train each client with local SGD and
average the client deltas `x - x_i`. FedAvg then steps the server model by that average; FedAdam
feeds the average, as a pseudo-gradient, to an Adam-like server optimiser (Reddi et al., 2021).
"""),
    code("""
algorithms = {
    "FedAvg": fl.algorithms.fed_avg(loss, optax.sgd(0.1)),
    "FedAdam": fl.algorithms.fed_adam(loss, optax.sgd(0.1), server_learning_rate=0.03),
}
"""),
    md("""
## Training

`fl.run_rounds` runs `ROUNDS` rounds as one `lax.scan`. Each round samples `cohort_size=10`
clients on the device, gives each one its own data in batches of 10 (one local epoch: clients
with less data take fewer real steps, the rest are masked), trains them, aggregates and updates
the server. Every `eval_every` rounds it evaluates on the pooled test data inside the same
program. How the clients of a cohort are mapped is a *client map*: the default
`fl.maps.auto()` picks a sequential map on CPU and `vmap` on GPU/TPU (pass
`client_map=fl.maps.vmap()` etc. to choose yourself). The first run of each algorithm includes
compilation.
"""),
    code("""
import time

results = {}
for name, alg in algorithms.items():
    start = time.perf_counter()
    state, history = fl.run_rounds(
        alg, alg.init(params), train, jax.random.key(1),
        num_rounds=ROUNDS, cohort_size=10, batch_size=10,
        eval_fn=eval_fn, eval_data=test, eval_every=EVAL_EVERY,
    )
    history = jax.device_get(history)
    seconds = time.perf_counter() - start
    results[name] = (state, history)
    acc = history["eval_accuracy"]
    final = float(acc[np.isfinite(acc)][-1])
    print(f"{name}: {ROUNDS} rounds in {seconds:.1f} s (compile included); "
          f"final test accuracy {final:.4f}")
"""),
    md("""
`history` holds one value per round for every metric: `train_loss`, `num_examples`,
`update_norm`, `client_ids` (the cohort of each round), `dropped_clients`, ... Evaluation
metrics are NaN on rounds without an evaluation.
"""),
    code("""
print(sorted(results["FedAvg"][1]))
print("cohort of round 1:", results["FedAvg"][1]["client_ids"][0])
"""),
    md("## Test accuracy and training loss"),
    code("""
fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
rounds = np.arange(1, ROUNDS + 1)
for name, (_, history) in results.items():
    acc = history["eval_accuracy"]
    due = np.isfinite(acc)
    ax_acc.plot(rounds[due], acc[due], marker="o", label=name)
    # The training loss of one round is noisy (10 clients); show a moving average.
    window = max(1, ROUNDS // 20)
    smooth = np.convolve(history["train_loss"], np.ones(window) / window, mode="valid")
    ax_loss.plot(rounds[window - 1:], smooth, label=name)
ax_acc.set(xlabel="round", ylabel="test accuracy", title="Test accuracy")
ax_loss.set(xlabel="round", ylabel="train loss", title=f"Train loss ({window}-round mean)")
for ax in (ax_acc, ax_loss):
    ax.grid(alpha=0.3)
    ax.legend()
plt.show()
"""),
    md("""
## Accuracy per client

One global accuracy hides how the model does for each client. `fl.evaluate` computes the loss
and accuracy of every client in one compiled program and summarises their distribution: the
10th percentile (p10) says how well the worst-served clients do.
"""),
    code("""
reports = {name: fl.evaluate(eval_fn, state.params, test) for name, (state, _) in results.items()}
print(f"{'algorithm':10s} {'accuracy':>9s} {'client p10':>11s} {'median':>7s} {'mean':>6s}")
for name, r in reports.items():
    print(f"{name:10s} {r['accuracy']:9.4f} {r['accuracy_p10']:11.4f} "
          f"{r['accuracy_p50']:7.4f} {r['accuracy_client_mean']:6.4f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
bins = np.linspace(0, 1, 11)
for name, r in reports.items():
    ax.hist(r["client_accuracy"], bins=bins, alpha=0.6, label=name)
ax.set(xlabel="client test accuracy", ylabel="clients", title="Accuracy over clients")
ax.legend()
plt.show()
"""),
    md("""
## Next

* `02_custom_algorithm.ipynb`: write your own client update and aggregator.
* `03_sweeps.ipynb`: a grid of hyper-parameters and seeds compiled as one program.
"""),
]

# ------------------------------------------------------------------------ 02 custom algorithm

CUSTOM = [
    md(f"""
# Write your own federated algorithm

{colab_badge("02_custom_algorithm")}

An algorithm in fedjax_lab is a `fl.FederatedAlgorithm`, a NamedTuple of four pure functions:

| field | called | does |
| --- | --- | --- |
| `init(params, num_clients=None)` | once | builds the `fl.ServerState` |
| `client_update(server_state, client, key)` | per client | local work; a `fl.ClientOutput` |
| `aggregator` | per cohort | a `fl.Aggregator`: turns the client updates into one |
| `server_update(server_state, aggregate, key)` | per round | applies the aggregate |

`client_update` is written for ONE client; the engine maps it over the cohort, drops clients
whose update is not finite, and skips a round in which no client counts. Here we build a FedAvg
whose clients clip their update, and a coordinate-wise trimmed-mean aggregator, each in a few
lines, and check them against an attack.
"""),
    code(INSTALL),
    code("""
import os

SMOKE = bool(os.environ.get("FEDJAX_LAB_SMOKE"))
ROUNDS = 20 if SMOKE else 200
print(f"{ROUNDS} rounds")
"""),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fedjax_lab as fl

train, test = fl.datasets.load("digits", num_clients=100, partition="dirichlet", alpha=0.5)
model = fl.models.mlp((8, 8, 1), hidden=(64,), num_classes=10)
loss = fl.models.classification_loss(model)
eval_fn = fl.models.classification_metrics(model)
params = model.init(jax.random.key(0))
"""),
    md("""
## A client that clips its update

`fl.client.local_training(loss_fn, optimizer)` gives `train(params, batches, key)`: local optax
training over the client's `[steps, batch]` data, with padded steps skipped. We reuse it, clip
the delta `x - x_i` to norm `clip_norm`, and add a metric. Metrics are sums over the cohort, so
`num_clipped` counts the clipped clients of each round. The server applies the aggregate with
any optax optimiser: `optax.sgd(1.0)` gives plain averaging.
"""),
    code("""
def clipped_fedavg(loss_fn, client_lr=0.1, clip_norm=1.0, server_optimizer=None,
                   aggregator=None):
    train_client = fl.client.local_training(loss_fn, optax.sgd(client_lr))
    server_optimizer = server_optimizer or optax.sgd(1.0)
    aggregator = aggregator or fl.aggregators.weighted_mean()

    def init(params, num_clients=None):
        return fl.ServerState(
            params=params,
            opt_state=server_optimizer.init(params),
            round=jnp.zeros((), jnp.int32),
            aggregator_state=aggregator.init(params),
        )

    def client_update(server_state, client, key):
        result = train_client(server_state.params, client.batches, key)
        delta = optax.tree.sub(server_state.params, result.params)
        norm = optax.tree.norm(delta)
        delta = optax.tree.scale(jnp.minimum(1.0, clip_norm / (norm + 1e-12)), delta)
        metrics = {**result.metrics, "num_clipped": (norm > clip_norm).astype(jnp.float32)}
        return fl.ClientOutput(update=delta, weight=client.weight, metrics=metrics)

    def server_update(server_state, aggregate, key):
        updates, opt_state = server_optimizer.update(
            aggregate, server_state.opt_state, server_state.params)
        params = optax.apply_updates(server_state.params, updates)
        return server_state._replace(params=params, opt_state=opt_state)

    return fl.FederatedAlgorithm(init, client_update, aggregator, server_update, "clipped_fedavg")
"""),
    md("""
## A trimmed-mean aggregator

An `fl.Aggregator` has two halves. `prepare(update, weight, state)` runs once per client, inside
the client map. Its results are either summed over the cohort (`reduce="sum"`: memory does not
grow with the cohort) or stacked `[C, ...]` (`reduce="stack"`: for rules that need every update
at once, like this one). `finalize(contributions, state, key)` returns
`(aggregate, total_weight, state)`; a total weight of 0 skips the round.

The coordinate-wise trimmed mean (Yin et al., ICML 2018) drops, for every coordinate, the
`t = floor(beta * n)` smallest and largest values of the `n` counted clients and averages the
rest. Clients of weight 0 (padding, or dropped because their update was not finite) are moved
to the end of the sort and never counted.
"""),
    code("""
def trimmed_mean(beta=0.1):
    def init(params):
        return ()

    def prepare(update, weight, state):
        return update, weight

    def finalize(contributions, state, key):
        updates, weights = contributions           # leaves [C, ...], weights [C]
        counted = weights > 0
        n = jnp.sum(counted)
        t = jnp.floor(beta * n).astype(n.dtype)
        rank = jnp.arange(weights.shape[0])
        keep = (rank >= t) & (rank < n - t)        # positions kept after sorting

        def one_leaf(u):
            shape = (-1,) + (1,) * (u.ndim - 1)
            ranked = jnp.sort(jnp.where(counted.reshape(shape), u, jnp.inf), axis=0)
            kept = jnp.where(keep.reshape(shape), ranked, 0.0)
            return jnp.sum(kept, axis=0) / jnp.maximum(n - 2 * t, 1)

        return jax.tree.map(one_leaf, updates), jnp.sum(weights), state

    return fl.Aggregator(init, prepare, finalize, reduce="stack")
"""),
    md("""
Check it by hand on five clients, one of them an outlier and one with weight 0: the outlier is
trimmed, the weight-0 client ignored.
"""),
    code("""
agg = trimmed_mean(beta=0.25)
updates = {"w": jnp.array([[1.0], [2.0], [3.0], [1000.0], [-7.0]])}
weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])     # the last client does not count
aggregate, total, _ = agg.finalize((updates, weights), (), jax.random.key(0))
print("trimmed mean:", float(aggregate["w"][0]), "(expected 2.5), total weight:", float(total))
"""),
    md("""
## An attack to defend against

Let clients 0-9 (10% of the population) be malicious: they ignore the clipping and send their
update times -10. A wrapper around any algorithm does it, since algorithms are plain
NamedTuples: replace `client_update` with `_replace`.
"""),
    code("""
def with_attackers(alg, num_attackers=10, scale=-10.0):
    def client_update(server_state, client, key):
        out = alg.client_update(server_state, client, key)
        bad = client.client_id < num_attackers
        update = jax.tree.map(lambda u: jnp.where(bad, scale * u, u), out.update)
        return out._replace(update=update)

    return alg._replace(client_update=client_update, name=alg.name + "+attack")
"""),
    md("""
## Run and compare

Each algorithm runs `ROUNDS` rounds with `fl.run_rounds`, exactly like the built-in ones. Client
updates here have norms of roughly 0.15-0.4 in the first rounds, so `clip_norm=0.3` clips the
larger ones. With a cohort of 10 and `beta=0.2`, the trimmed mean drops the 2 smallest and
2 largest values of every coordinate.
"""),
    code("""
candidates = {
    "FedAvg": fl.algorithms.fed_avg(loss, optax.sgd(0.1)),
    "clip + trimmed mean": clipped_fedavg(loss, client_lr=0.1, clip_norm=0.3,
                                          aggregator=trimmed_mean(beta=0.2)),
}
candidates.update({f"{k}, attacked": with_attackers(v) for k, v in list(candidates.items())})

histories = {}
for name, alg in candidates.items():
    state, history = fl.run_rounds(
        alg, alg.init(params), train, jax.random.key(1),
        num_rounds=ROUNDS, cohort_size=10, batch_size=10,
        eval_fn=eval_fn, eval_data=test, eval_every=ROUNDS // 10,
    )
    histories[name] = jax.device_get(history)
    final = float(fl.evaluate(eval_fn, state.params, test)["accuracy"])
    print(f"{name:29s} final test accuracy {final:.4f}")
print("clients clipped in each of the first 10 rounds:",
      histories["clip + trimmed mean"]["num_clipped"][:10])
"""),
    code("""
fig, ax = plt.subplots(figsize=(7, 4))
rounds = np.arange(1, ROUNDS + 1)
for name, history in histories.items():
    acc = history["eval_accuracy"]
    due = np.isfinite(acc)
    ax.plot(rounds[due], acc[due], marker="o", label=name,
            linestyle="--" if "attacked" in name else "-")
ax.set(xlabel="round", ylabel="test accuracy", title="A custom algorithm vs FedAvg")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()
"""),
    md("""
One attacker in a cohort of ten is enough to wreck the weighted mean. The trimmed mean keeps
learning. Robustness has a price: with label skew, honest clients disagree, and trimming throws
some of their information away too, so without an attack it learns more slowly than FedAvg.
"""),
    md("""
## One round on a cohort you build yourself

`fl.run_rounds` samples cohorts for you. For full control (your own sampling, data from
elsewhere) call `fl.run_round` on a `fl.Cohort`: a dict of batches with leading axes
`[C clients, S steps, B batch]` and a mask (1 = real example, 0 = padding), one weight per
client and the client ids. Here we take clients 0-3, one local epoch in batches of 10, and pad
every client to the largest one.
"""),
    code("""
def make_cohort(data, client_ids, batch_size):
    clients = [data.client(int(i)) for i in client_ids]
    sizes = [len(c["y"]) for c in clients]
    steps = -(-max(sizes) // batch_size)           # ceil: enough steps for the largest client
    slots = steps * batch_size
    batches = {}
    for name in ("x", "y"):
        padded = []
        for c in clients:
            v = np.asarray(c[name])
            pad = np.zeros((slots - len(v),) + v.shape[1:], v.dtype)
            padded.append(np.concatenate([v, pad]).reshape((steps, batch_size) + v.shape[1:]))
        batches[name] = np.stack(padded)
    batches["mask"] = np.stack([(np.arange(slots) < n).astype(np.float32).reshape(steps, -1)
                                for n in sizes])
    return fl.Cohort(batches, weights=np.asarray(sizes, np.float32),
                     client_ids=np.asarray(client_ids, np.int32))


cohort = make_cohort(train, [0, 1, 2, 3], batch_size=10)
print({k: v.shape for k, v in cohort.batches.items()}, "weights", cohort.weights)

alg = clipped_fedavg(loss, clip_norm=0.3, aggregator=trimmed_mean(beta=0.25))
state = alg.init(params)
state, metrics = fl.run_round(alg, state, cohort, jax.random.key(2))
print(f"run_round on a hand-made cohort: round {int(state.round)}, "
      f"train loss {float(metrics['train_loss']):.4f}, "
      f"clipped clients {int(metrics['num_clipped'])}, "
      f"update norm {float(metrics['update_norm']):.4f}")
"""),
    md("""
The client map decides how the cohort is computed, not what. `run_round` used the default
`fl.maps.auto()` (a sequential map on CPU, `vmap` on GPU/TPU); forcing `vmap` gives the same
round up to float rounding.
"""),
    code("""
vmapped, _ = fl.run_round(alg, alg.init(params), cohort, jax.random.key(2),
                          client_map=fl.maps.vmap())
diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(vmapped.params), strict=True))
print(f"max |auto() - vmap()| over the new params: {diff:.2e}")
"""),
]

# ------------------------------------------------------------------------------- 03 sweeps

SWEEPS = [
    md(f"""
# Hyper-parameter sweeps as one compiled program

{colab_badge("03_sweeps")}

`fl.run_sweep` runs a whole grid of hyper-parameters times seeds as ONE XLA program: the training
run (a `lax.scan` over rounds) is mapped over the configurations (`vmap` on GPU/TPU, a
sequential map on CPU). It compiles once instead of once per configuration. We sweep FedAdam's
client and server learning rates on federated digits, print a table and a heat map, and time it
against running the configurations one by one.
"""),
    code(INSTALL),
    code("""
import os

SMOKE = bool(os.environ.get("FEDJAX_LAB_SMOKE"))
ROUNDS = 10 if SMOKE else 100
SEEDS = (0, 1)
CLIENT_LRS = [0.03, 0.1] if SMOKE else [0.01, 0.03, 0.1, 0.3]
SERVER_LRS = [0.03] if SMOKE else [0.003, 0.01, 0.03, 0.1]
print(f"{len(CLIENT_LRS) * len(SERVER_LRS)} configurations x {len(SEEDS)} seeds, "
      f"{ROUNDS} rounds each")
"""),
    code("""
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import fedjax_lab as fl

train, test = fl.datasets.load("digits", num_clients=100, partition="dirichlet", alpha=0.5)
model = fl.models.mlp((8, 8, 1), hidden=(64,), num_classes=10)
loss = fl.models.classification_loss(model)
eval_fn = fl.models.classification_metrics(model)
"""),
    md("""
## The algorithm as a function of its hyper-parameters

`make_algorithm(**hparams)` is called INSIDE the compiled program with every hyper-parameter as
a traced scalar (optax optimisers accept array learning rates). The program is cached on
`make_algorithm`, so it must be hashable: define it at the top level (as here) or as a
`functools.partial` of a top-level function that you keep, not as a fresh lambda each time.
"""),
    code("""
def make_algorithm(client_lr, server_lr):
    return fl.algorithms.fed_adam(loss, optax.sgd(client_lr), server_learning_rate=server_lr)


configs = fl.grid(client_lr=CLIENT_LRS, server_lr=SERVER_LRS)
print(configs)
"""),
    md("""
## The sweep

Every (configuration, seed) run draws its initial params and its run key from its seed, so each
row equals a single `fl.run_rounds` run of that configuration. The test accuracy is measured
after the last round.
"""),
    code("""
start = time.perf_counter()
rows = fl.run_sweep(make_algorithm, configs, model.init, train, seeds=SEEDS, num_rounds=ROUNDS,
                cohort_size=10, batch_size=10, eval_fn=eval_fn, eval_data=test)
sweep_seconds = time.perf_counter() - start
print(f"{len(rows)} runs in {sweep_seconds:.1f} s (compile included)\\n")

print(f"{'client_lr':>9s} {'server_lr':>9s} {'seed':>4s} {'train_loss':>10s} {'test_acc':>8s}")
for r in rows:
    print(f"{r['client_lr']:9g} {r['server_lr']:9g} {r['seed']:4d} "
          f"{r['final_train_loss']:10.4f} {r['test_accuracy']:8.4f}")
"""),
    md("## Mean over seeds, and the best configuration"),
    code("""
mean_acc = np.zeros((len(CLIENT_LRS), len(SERVER_LRS)))
for i, c in enumerate(CLIENT_LRS):
    for j, s in enumerate(SERVER_LRS):
        mean_acc[i, j] = np.mean([r["test_accuracy"] for r in rows
                                  if r["client_lr"] == c and r["server_lr"] == s])
best_i, best_j = np.unravel_index(np.argmax(mean_acc), mean_acc.shape)
print(f"best: client_lr={CLIENT_LRS[best_i]:g}, server_lr={SERVER_LRS[best_j]:g}, "
      f"final test accuracy {mean_acc[best_i, best_j]:.4f} (mean over {len(SEEDS)} seeds)")

fig, ax = plt.subplots(figsize=(1.3 * len(SERVER_LRS) + 3, 0.8 * len(CLIENT_LRS) + 2))
im = ax.imshow(mean_acc, cmap="viridis", origin="lower", aspect="auto")
for i in range(len(CLIENT_LRS)):
    for j in range(len(SERVER_LRS)):
        ax.text(j, i, f"{mean_acc[i, j]:.3f}", ha="center", va="center", color="w")
ax.set_xticks(range(len(SERVER_LRS)), [f"{s:g}" for s in SERVER_LRS])
ax.set_yticks(range(len(CLIENT_LRS)), [f"{c:g}" for c in CLIENT_LRS])
ax.set(xlabel="server learning rate", ylabel="client learning rate",
       title="FedAdam: final test accuracy")
fig.colorbar(im, ax=ax)
plt.show()
"""),
    md("""
## One by one, for comparison

The same runs with `fl.run_rounds`, one configuration and seed at a time. Each new algorithm is
a new program, so each run compiles again; that is what the sweep saves (and on a GPU it also
runs the configurations side by side). We also check that the results agree.
"""),
    code("""
start = time.perf_counter()
one_by_one = []
for config in configs:
    for seed in SEEDS:
        alg = make_algorithm(**config)
        init_key, run_key = jax.random.split(jax.random.key(seed))
        state, history = fl.run_rounds(
            alg, alg.init(model.init(init_key)), train, run_key,
            num_rounds=ROUNDS, cohort_size=10, batch_size=10,
            eval_fn=eval_fn, eval_data=test, eval_every=ROUNDS,
        )
        one_by_one.append(float(history["eval_accuracy"][-1]))
loop_seconds = time.perf_counter() - start

gap = max(abs(a - r["test_accuracy"]) for a, r in zip(one_by_one, rows, strict=True))
print(f"one by one: {len(one_by_one)} runs in {loop_seconds:.1f} s; "
      f"sweep: {sweep_seconds:.1f} s")
print(f"sweep speed-up: {loop_seconds / sweep_seconds:.2f}x")
print(f"max |sweep - one by one| test accuracy: {gap:.2e}")
"""),
    md("""
The command line does the same from a config file: `fedjax-lab sweep CONFIG --out DIR` writes
`sweep.csv` and `sweep.png`.
"""),
]

# ------------------------------------------------------------------ 04 a stateful algorithm

STATEFUL = [
    md(f"""
# Write a stateful algorithm from the kit

{colab_badge("04_stateful_algorithm")}

`fl.kit` holds the parts every algorithm of `fl.algorithms` is built from: the masked local loop
(with hooks for a gradient correction and a regulariser), the server state and server step, and
per-client state kept as one stacked `[num_clients, ...]` pytree. Here we write a SCAFFOLD-like
algorithm with per-client control variates in one short cell, check it against the library's
SCAFFOLD, write a new aggregator, register both, and run them from a config.
"""),
    md("Install the library when it is missing (on Colab). Nothing else is downloaded."),
    code(INSTALL),
    code("""
import os
import tempfile

import jax
import jax.numpy as jnp
import optax

import fedjax_lab as fl
from fedjax_lab import kit

SMOKE = os.environ.get("FEDJAX_LAB_SMOKE") == "1"
ROUNDS = 4 if SMOKE else 100
"""),
    md("""
## The algorithm

Each client keeps a control variate `c_i` (per-client state); the server keeps their mean `c`
(`state.extra`). A local step follows `g - c_i + c` (the kit's `correction` hook, which also
sums the raw gradients `g`); afterwards `c_i` becomes the mean raw gradient. The client sends
`(x - y_i, c_i' - c_i)`; `mean_and_sum()` averages the first part and sums the second, and the
server moves `c` by the sum over the population size.
"""),
    code("""
@fl.algorithms.register("my_scaffold")
def my_scaffold(loss_fn, client_optimizer=None, *, server_optimizer=None,
                server_learning_rate=1.0, name="my_scaffold"):
    optimizer = kit.client_optimizer(client_optimizer)
    server_opt = kit.server_optimizer(server_optimizer, server_learning_rate)
    aggregator = fl.aggregators.mean_and_sum()

    def init(params, num_clients=None):
        n = kit.check_num_clients(num_clients)
        c_i = () if n is None else kit.zeros_per_client(params, n)
        return kit.server_state(params, server_opt, aggregator, client_states=c_i,
                                extra=optax.tree.zeros_like(params))

    def client_update(state, client, key):
        kit.require_client_state(client.state, name)
        shift = optax.tree.sub(state.extra, client.state)  # c - c_i
        train = kit.local_training(loss_fn, optimizer,
                                   correction=lambda g, *_: (optax.tree.add(g, shift), g))
        result = train(state.params, client.batches, key)
        steps = result.metrics["num_steps"]
        new_c_i = optax.tree.where(steps > 0, optax.tree.scale(1 / jnp.maximum(steps, 1),
                                                               result.stats), client.state)
        update = (kit.client_delta(state.params, result.params),
                  optax.tree.sub(new_c_i, client.state))
        return fl.ClientOutput(update, client.weight, result.metrics, new_c_i)

    def server_update(state, aggregate, key):
        mean_dx, sum_dc = aggregate
        n = kit.population_size(state.client_states)
        c = optax.tree.add(state.extra, optax.tree.scale(1 / n, sum_dc))
        return kit.apply_server_optimizer(state, server_opt, mean_dx)._replace(extra=c)

    return fl.FederatedAlgorithm(init, client_update, aggregator, server_update, name,
                                 update_is_delta=False, check_data=kit.data_check(loss_fn))
"""),
    md("""
It is SCAFFOLD (option II): run both on the same data and key and compare the parameters and
the control variates.
"""),
    code("""
train, test = fl.datasets.load("digits", num_clients=50, partition="dirichlet", alpha=0.5)
model = fl.models.mlp((8, 8, 1), hidden=(32,), num_classes=10)
loss = fl.models.classification_loss(model)
params = model.init(jax.random.key(0))
run = dict(num_rounds=ROUNDS, cohort_size=10, batch_size=10, client_map=fl.maps.sequential())

states = {}
for label, alg in [("mine", my_scaffold(loss, optax.sgd(0.1))),
                   ("library", fl.algorithms.scaffold(loss, optax.sgd(0.1)))]:
    state = alg.init(params, num_clients=train.num_clients)
    states[label], _ = fl.run_rounds(alg, state, train, jax.random.key(1), **run)
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
    jax.tree.leaves((states["mine"].params, states["mine"].client_states)),
    jax.tree.leaves((states["library"].params, states["library"].client_states)), strict=True))
print(f"max |my_scaffold - fl.algorithms.scaffold| over params and control variates: {diff:.2e}")
"""),
    md("""
## A new aggregator

`kit.stateless_aggregator(prepare, finalize)` makes an `Aggregator` from two functions:
`prepare` runs per client inside the client map (here: clip the delta to norm `tau`), and the
contributions are summed over the cohort (or stacked, with `reduce="stack"`). Registering it
makes it available to configs under `[algorithms.aggregator]`.
"""),
    code("""
@fl.aggregators.REGISTRY.register("clipped_mean")
def clipped_mean(tau: float = 1.0):
    def prepare(update, weight):
        scale = jnp.minimum(1.0, tau / (optax.tree.norm(update) + 1e-12))
        return optax.tree.scale(weight * scale, update), weight

    def finalize(summed):
        total, weight = summed
        return optax.tree.scale(1.0 / jnp.maximum(weight, 1e-12), total), weight

    return kit.stateless_aggregator(prepare, finalize)
"""),
    md("""
## Both from a config

A config names the registered pieces; part tables compose an aggregator, an attack,
compression or DP with any algorithm whose clients send the model delta. Every key is checked
before any data loads.
"""),
    code("""
config = {
    "name": "digits: my_scaffold vs FedAdam with a clipped mean",
    "data": {"name": "digits", "num_clients": 50, "partition": "dirichlet", "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [32]},
    "training": {"rounds": ROUNDS, "cohort_size": 10, "batch_size": 10,
                 "client_map": "sequential"},
    "evaluation": {"every": 2 if SMOKE else 25},
    "checkpoint": {"every": 2 if SMOKE else 50},
    "algorithms": [
        {"name": "my_scaffold", "client_learning_rate": 0.1},
        {"name": "fedadam", "label": "fedadam_clipped", "server_learning_rate": 0.03,
         "aggregator": {"name": "clipped_mean", "tau": 1.0}},
    ],
}
try:
    fl.experiment.validate({**config, "algorithms": [
        {"name": "fedadam", "aggregator": {"name": "clipped_mean", "tua": 1.0}}]})
except fl.experiment.ConfigError as e:
    print("a misspelt key is refused:", e)

with tempfile.TemporaryDirectory() as out:
    summary = fl.cli.run_experiment(config, out, progress=False)
for label, result in summary["runs"].items():
    print(f"{label}: final test accuracy {result['test_accuracy']:.3f}")
"""),
]

# ------------------------------------------------------------- 05 the compiled simulator

COMPILED = [
    md(f"""
# What a compiled simulator can do

{colab_badge("05_compiled_simulator")}

A whole federated run here is ONE XLA program (a `lax.scan` over rounds, clients mapped inside
each round). That makes some research tools cheap that a framework running rounds from Python
cannot offer: many seeds as one program with error bars, hyper-parameters that differ per client,
gradients of a validation loss through the whole run, the non-IID level as a sweep axis, and
client valuation as one batched program over participation masks.
"""),
    md("Install the library when it is missing (on Colab). Nothing else is downloaded."),
    code(INSTALL),
    code("""
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fedjax_lab as fl

SMOKE = bool(os.environ.get("FEDJAX_LAB_SMOKE"))
ROUNDS = 10 if SMOKE else 100
NUM_SEEDS = 4 if SMOKE else 16
RUN = dict(num_rounds=ROUNDS, cohort_size=10, batch_size=10)

train, test = fl.datasets.load("digits", num_clients=50, partition="dirichlet", alpha=0.5)
model = fl.models.mlp((8, 8, 1), hidden=(32,), num_classes=10)
loss = fl.models.classification_loss(model)
eval_fn = fl.models.classification_metrics(model)
print(f"{ROUNDS} rounds, {NUM_SEEDS} seeds, {train.num_clients} clients")
"""),
    md("""
## 1. Error bars by default: all seeds as one program

`fl.sweep.run_seeds` runs S seeds (each its own initial model and run key) as one program;
seed `i` equals the single run `fl.run_rounds(alg, states[i], train, keys[i], ...)`.
`fl.metrics.mean_ci95` gives the mean and the 95% confidence half-width (Student's t). From the
command line, `seeds = 16` in `[training]` (or `--seeds 16`) does the same and writes mean ± CI
into `summary.json`, the table and the plots.
"""),
    code("""
alg = fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(0.1))
inits, keys = [], []
for seed in range(NUM_SEEDS):
    init_key, run_key = jax.random.split(jax.random.key(seed))
    inits.append(alg.init(model.init(init_key)))
    keys.append(run_key)

EVAL_EVERY = ROUNDS // 5
start = time.perf_counter()
states, history = fl.sweep.run_seeds(
    alg, fl.sweep.stack_seeds(inits), train, fl.sweep.stack_seeds(keys),
    eval_fn=eval_fn, eval_data=test, eval_every=EVAL_EVERY, **RUN)
acc = np.asarray(history["eval_accuracy"])  # [seeds, rounds], NaN between evaluations
print(f"{NUM_SEEDS} seeds in one program: {time.perf_counter() - start:.1f} s")
final = fl.metrics.mean_ci95(acc[:, -1].tolist())
print(f"final test accuracy {final['mean']:.4f} ± {final['ci95']:.4f} "
      f"(95% CI over {final['n']} seeds)")

evaluated = np.flatnonzero(~np.isnan(acc[0]))
bands = [fl.metrics.mean_ci95(acc[:, t].tolist()) for t in evaluated]
mean = np.array([b["mean"] for b in bands])
half = np.array([b["ci95"] for b in bands])
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(evaluated + 1, mean, marker="o", label="FedAvg, mean")
ax.fill_between(evaluated + 1, mean - half, mean + half, alpha=0.3, label="95% CI")
ax.set(xlabel="round", ylabel="test accuracy", title=f"{NUM_SEEDS} seeds, one program")
ax.legend()
plt.show()
"""),
    md("""
## 2. Per-client hyper-parameters as arrays

`fl.kit.per_client` takes one value per client (or a function of the client sizes); the
algorithm gathers client `i`'s value inside the vmapped client update. Here the client learning
rate grows with the square root of the client's size. Equal per-client values reproduce the
scalar run bit for bit.
"""),
    code("""
rates = fl.kit.per_client(lambda n: 0.1 * np.sqrt(n / n.mean()), client_sizes=train)
print(f"client learning rates from {float(rates.values.min()):.3f} "
      f"to {float(rates.values.max()):.3f}")

init_key, run_key = jax.random.split(jax.random.key(0))
params0 = model.init(init_key)


def run(alg):
    state, hist = fl.run_rounds(alg, alg.init(params0), train, run_key, eval_fn=eval_fn,
                                eval_data=test, eval_every=ROUNDS, **RUN)
    return state, float(hist["eval_accuracy"][-1])


scalar, scalar_acc = run(fl.algorithms.fed_avg(loss, client_learning_rate=0.1))
equal, _ = run(fl.algorithms.fed_avg(
    loss, client_learning_rate=fl.kit.per_client(np.full(train.num_clients, 0.1))))
_, sized_acc = run(fl.algorithms.fed_avg(loss, client_learning_rate=rates))
same = all(bool(jnp.array_equal(a, b)) for a, b in zip(
    jax.tree.leaves(scalar.params), jax.tree.leaves(equal.params), strict=True))
print(f"equal per-client rates == the scalar run, bit for bit: {same}")
print(f"test accuracy: scalar rate {scalar_acc:.4f}, rate ~ sqrt(size) {sized_acc:.4f}")
"""),
    md("""
## 3. Gradients through the whole run

`fl.meta.unrolled_loss` builds `L(hparams)`, the validation loss after R rounds, as a
differentiable function (each round under `jax.checkpoint`). We tune FedAvg's server learning
rate by gradient descent on its logarithm and compare with a grid search given the same number of
runs, on heterogeneous least squares (8 clients whose true models scatter around a common one).
"""),
    code("""
DIM, CLIENTS, R, STEPS = 5, 8, 10, (3 if SMOKE else 20)
rng = np.random.default_rng(0)
w = rng.normal(size=DIM)
w_clients = w + 0.5 * rng.normal(size=(CLIENTS, DIM))
x = rng.normal(size=(R, CLIENTS, 5, 8, DIM)).astype(np.float32)  # [round, client, step, batch]
y = np.einsum("rcsbd,cd->rcsb", x, w_clients) + 0.1 * rng.normal(size=x.shape[:-1])
cohorts = fl.Cohort({"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.float32),
                     "mask": jnp.ones(x.shape[:-1], jnp.float32)},
                    jnp.ones((R, CLIENTS), jnp.float32),
                    jnp.tile(jnp.arange(CLIENTS, dtype=jnp.int32), (R, 1)))
x_val = jnp.asarray(rng.normal(size=(256, DIM)), jnp.float32)
y_val = x_val @ jnp.asarray(w, jnp.float32)


def ls_loss(p, batch, key):
    del key
    err = batch["mask"] * (batch["x"] @ p - batch["y"])
    return jnp.sum(err**2) / jnp.maximum(batch["mask"].sum(), 1.0)


def make_fedavg(server_lr):
    return fl.algorithms.fed_avg(ls_loss, client_learning_rate=0.05,
                                 server_learning_rate=server_lr)


val_loss = fl.meta.unrolled_loss(make_fedavg, jnp.zeros(DIM), cohorts,
                                 lambda p: jnp.mean((x_val @ p - y_val) ** 2),
                                 key=jax.random.key(0))
g = jax.grad(lambda s: val_loss({"server_lr": s}))(jnp.float32(1.0))
h = 1e-2
fd = (val_loss({"server_lr": jnp.float32(1 + h)})
      - val_loss({"server_lr": jnp.float32(1 - h)})) / (2 * h)
print(f"dL/d server_lr at 1: autodiff {float(g):.5f}, finite differences {float(fd):.5f}")

value_and_grad = jax.jit(jax.value_and_grad(lambda u: val_loss({"server_lr": jnp.exp(u)})))
opt = optax.adam(0.3)
u = jnp.zeros(())  # server_lr = 1: plain FedAvg
opt_state = opt.init(u)
for _ in range(STEPS):
    _, grad = value_and_grad(u)
    updates, opt_state = opt.update(grad, opt_state, u)
    u = optax.apply_updates(u, updates)
tuned_lr = float(jnp.exp(u))
tuned_loss = float(val_loss({"server_lr": jnp.exp(u)}))
grid = np.geomspace(0.1, 10.0, STEPS + 1)
grid_losses = np.array([float(val_loss({"server_lr": jnp.float32(lr)})) for lr in grid])
best = int(np.nanargmin(grid_losses))
print(f"gradient descent: server_lr {tuned_lr:.3f}, val loss {tuned_loss:.5f} ({STEPS + 1} runs)")
print(f"grid search:      server_lr {grid[best]:.3f}, val loss {grid_losses[best]:.5f} "
      f"({len(grid)} runs)")
"""),
    md("""
## 4. The non-IID level as a sweep axis

`fl.sweep.dirichlet_axis` splits the same examples once per Dirichlet α; `fl.run_sweep` runs
configuration × α × seed as one program (the populations padded to a common shape), each row
equal to the single run on that partition. `fl.sweep.malicious_axis` and
`fl.sweep.DPAccounting` do the same for the malicious fraction and the noise multiplier.
"""),
    code("""
ALPHAS = [0.05, 100.0] if SMOKE else [0.05, 0.1, 0.5, 1.0, 100.0]
SEEDS = (0,) if SMOKE else (0, 1, 2)
axis = fl.sweep.dirichlet_axis(train.examples, 50, ALPHAS, seed=0)


def make_algorithm(client_lr):
    return fl.algorithms.fed_avg(loss, client_optimizer=optax.sgd(client_lr))


start = time.perf_counter()
rows = fl.run_sweep(make_algorithm, fl.grid(client_lr=[0.1]), model.init, axis, seeds=SEEDS,
                    eval_fn=eval_fn, eval_data=test, **RUN)
print(f"{len(rows)} runs in one program: {time.perf_counter() - start:.1f} s")
print(f"{'alpha':>7s} {'test_acc':>8s}")
for alpha in ALPHAS:
    accs = [r["test_accuracy"] for r in rows if r["alpha"] == alpha]
    print(f"{alpha:7g} {np.mean(accs):8.4f}")
"""),
    md("""
## 5. Client valuation: Shapley values as one batched program

`fl.valuation.utility` turns "train on this coalition of clients, then score the model" into a
function of participation masks, evaluated for a whole batch of masks by vmapping the run
(clients outside the coalition become zero-weight padding). Leave-one-out and Monte-Carlo
Shapley values are then a few calls of it. We give one client random labels and look at where
its value lands.
"""),
    code("""
N, PERMUTATIONS = 20, (4 if SMOKE else 200)
pop, pop_test = fl.datasets.load("digits", num_clients=N, partition="dirichlet", alpha=0.5)
planted = int(np.argsort(pop.client_sizes)[N // 2])  # a client of median size
y = np.array(pop.examples["y"])
lo, hi = int(pop.offsets[planted]), int(pop.offsets[planted + 1])
y[lo:hi] = np.random.default_rng(0).integers(0, 10, hi - lo)  # its labels carry no signal
pop = fl.FederatedData.from_offsets(dict(pop.examples, y=y.astype(np.int32)), pop.offsets)

linear = fl.models.mlp((8, 8, 1), hidden=(), num_classes=10)  # logistic regression
fedavg = fl.algorithms.fed_avg(fl.models.classification_loss(linear),
                               client_optimizer=optax.sgd(0.1))
U = fl.valuation.utility(
    fedavg, fedavg.init(linear.init(jax.random.key(0))), pop,
    fl.valuation.validation_fn(fl.models.classification_metrics(linear), pop_test),
    jax.random.key(1), num_rounds=5, batch_size=10, chunk_size=16)

start = time.perf_counter()
loo = fl.valuation.leave_one_out(U, N)
shapley = fl.valuation.monte_carlo_shapley(U, N, jax.random.key(2), num_permutations=PERMUTATIONS)
print(f"{U.num_evaluations} coalitions trained in {time.perf_counter() - start:.1f} s")
for name, v in [("leave-one-out", loo), ("Monte-Carlo Shapley", shapley)]:
    rank = int(np.flatnonzero(np.argsort(np.asarray(v.values)) == planted)[0]) + 1
    print(f"{name}: planted client {float(v.values[planted]):+.4f}, rank {rank} of {N} "
          f"from the lowest; others' mean {float(np.delete(v.values, planted).mean()):+.4f}")
gap = float(shapley.values.sum()) - (shapley.utility_all - shapley.utility_empty)
print(f"efficiency: sum of Shapley values - (U(all) - U(empty)) = {gap:.1e}")
"""),
]

NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_custom_algorithm": CUSTOM,
    "03_sweeps": SWEEPS,
    "04_stateful_algorithm": STATEFUL,
    "05_compiled_simulator": COMPILED,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` as an ``nbformat`` node, without outputs, with stable cell ids."""
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(source)
        cell["id"] = f"{name[:2]}-{i:02d}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    }
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    for name in argv or NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        nbformat.write(build(name), path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

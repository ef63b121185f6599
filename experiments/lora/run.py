"""Federated LoRA vs full fine-tuning of a pretrained char transformer on Shakespeare.

The roles speaking at least 100 verse lines (315 clients) are split at random in two halves.
A small causal transformer (:func:`fedjax_lab.models.char_transformer`: width 64, 4 heads, 2
pre-LN blocks, MLP 128; 83k parameters) is pretrained CENTRALLY on the first half's training
windows (``PRETRAIN_STEPS`` Adam steps, batch 32). It is then fine-tuned FEDERATED on the other
half (never seen in pretraining): ``ROUNDS`` rounds, 10 clients a round, 5 local SGD steps of
batch 8, from the same pretrained params and run key, by

* full fine-tuning with FedAvg (every parameter trains and travels);
* LoRA (rank 4, alpha 8, on every attention and MLP kernel: ``target = "attention|dense"``)
  with FedAvg and with FedAdam (Reddi form) over the adapters, each with the ``"separate"``
  (FedIT) and ``"exact"`` (FedEx-LoRA) aggregation rules.

Reported: accuracy and loss on the fine-tuning roles' held-out windows (every real next-character
position), the bits one client sends a round (32 bits a float: its adapters, or the whole model)
and their ratio, how far the "exact" rule moved the frozen base kernels, and wall time (compile
included, one shared 2-core machine).

    python experiments/lora/run.py --out experiments/lora/results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_lab as fl

MIN_LINES, PRETRAIN_STEPS, ROUNDS, COHORT, LOCAL_STEPS, BATCH = 100, 300, 30, 10, 5, 8
RANK, ALPHA, TARGET = 4, 8.0, "attention|dense"
FULL_LR, LORA_LR, FEDADAM_LR = 0.3, 1.0, 1e-2
MODEL = dict(d_model=64, num_heads=4, num_layers=2, mlp_dim=128)


def pretrain(model, loss, data, steps, key):
    """Central Adam on the pooled windows of ``data`` (batch 32, one shuffled pass, repeated)."""
    opt = optax.adam(3e-3)
    x, y = data.examples["x"], data.examples["y"]

    @jax.jit
    def step(params, opt_state, xb, yb, k):
        batch = {"x": xb, "y": yb, "mask": jnp.ones(xb.shape[0])}
        value, grads = jax.value_and_grad(loss)(params, batch, k)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = model.init(key)
    opt_state = opt.init(params)
    order = np.random.default_rng(0).permutation(len(x))
    for s in range(steps):
        idx = order[(s * 32) % (len(x) - 32):][:32]
        params, opt_state, value = step(params, opt_state, x[idx], y[idx], key)
    return params, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    args = parser.parse_args()
    start = time.perf_counter()
    train, test = fl.datasets.load_shakespeare(min_lines=MIN_LINES)
    roles = np.random.default_rng(0).permutation(train.num_clients)
    pre, fine = np.sort(roles[: len(roles) // 2]), np.sort(roles[len(roles) // 2:])
    fine_train, fine_test = train.select_clients(fine), test.select_clients(fine)
    model = fl.models.char_transformer(fl.datasets.SHAKESPEARE_VOCAB_SIZE, 80, **MODEL)
    loss = fl.models.classification_loss(model, pad_id=fl.datasets.SHAKESPEARE_PAD_ID)
    metrics = fl.models.classification_metrics(model, pad_id=fl.datasets.SHAKESPEARE_PAD_ID)

    t0 = time.perf_counter()
    params0, last_loss = pretrain(model, loss, train.select_clients(pre), args.pretrain_steps,
                                  jax.random.key(0))
    before = fl.evaluate(metrics, params0, fine_test)
    pre_seconds = time.perf_counter() - t0
    print(f"pretrained {args.pretrain_steps} steps on {len(pre)} roles in {pre_seconds:.0f} s "
          f"(last batch loss {last_loss:.3f}); on the {len(fine)} fine-tuning roles: "
          f"accuracy {float(before['accuracy']):.4f}, loss {float(before['loss']):.4f}")

    bits = fl.algorithms.lora_uplink_bits(params0, rank=RANK, target=TARGET)
    lora = dict(rank=RANK, alpha=ALPHA, target=TARGET)
    runs = {"full_fedavg": fl.algorithms.fed_avg(loss, optax.sgd(FULL_LR))}
    for server, opt in (("fedavg", None), ("fedadam", fl.server.fed_adam(FEDADAM_LR))):
        for rule in fl.algorithms.AGGREGATIONS:
            runs[f"lora_{server}_{rule}"] = fl.algorithms.fed_lora(
                loss, optax.sgd(LORA_LR), aggregation=rule, server_optimizer=opt, **lora)

    mask = jax.tree.leaves(fl.models.lora_mask(params0, TARGET))
    kernels = [x for x, m in zip(jax.tree.leaves(params0), mask, strict=True) if m]
    rows = []
    for label, alg in runs.items():
        t0 = time.perf_counter()
        state, hist = fl.run_rounds(alg, alg.init(params0), fine_train, jax.random.key(1),
                                    num_rounds=args.rounds, cohort_size=COHORT,
                                    batch_size=BATCH, local_steps=LOCAL_STEPS,
                                    client_map=fl.maps.sequential())
        final = fl.evaluate(metrics, state.params, fine_test)
        seconds = time.perf_counter() - t0
        is_lora = label.startswith("lora")
        sent = bits["lora_bits"] if is_lora else bits["full_bits"]
        base_moved = 0.0
        if is_lora:
            base_moved = max(float(jnp.max(jnp.abs(a - b)))
                             for a, b in zip(state.extra.base, kernels, strict=True))
            measured = float(np.sum(hist["bits_sent"])) / float(args.rounds * COHORT)
            assert measured == sent, (label, measured, sent)  # the rounds' bits_sent metric
        rows.append({
            "run": label,
            "test_accuracy": float(final["accuracy"]),
            "test_loss": float(final["loss"]),
            "final_train_loss": float(hist["train_loss"][-1]),
            "uplink_bits_per_client_round": int(sent),
            "uplink_ratio_vs_full": sent / bits["full_bits"],
            "max_abs_base_change": base_moved,
            "wall_s": seconds,
        })

    print(f"\n{'run':24s} {'test acc':>8s} {'test loss':>9s} {'uplink bits':>11s} "
          f"{'ratio':>6s} {'|dW0|max':>9s} {'wall s':>6s}")
    print(f"{'pretrained (no FL)':24s} {float(before['accuracy']):8.4f} "
          f"{float(before['loss']):9.4f}")
    for r in rows:
        print(f"{r['run']:24s} {r['test_accuracy']:8.4f} {r['test_loss']:9.4f} "
              f"{r['uplink_bits_per_client_round']:11d} {r['uplink_ratio_vs_full']:6.3f} "
              f"{r['max_abs_base_change']:9.2e} {r['wall_s']:6.1f}")
    result = {
        "setup": {
            "data": f"shakespeare, roles with >= {MIN_LINES} lines: {train.num_clients}; "
                    f"{len(pre)} pretraining roles, {len(fine)} fine-tuning roles "
                    f"({fine_train.num_examples} train / {fine_test.num_examples} test windows)",
            "model": {"name": "char_transformer", **MODEL,
                      "num_params": fl.models.num_params(params0)},
            "pretraining": {"steps": args.pretrain_steps, "batch": 32, "optimizer": "adam 3e-3",
                            "seconds": pre_seconds},
            "federated": {"rounds": args.rounds, "cohort_size": COHORT,
                          "local_steps": LOCAL_STEPS, "batch_size": BATCH,
                          "client_sgd_lr": {"full": FULL_LR, "lora": LORA_LR},
                          "fedadam_server_lr": FEDADAM_LR},
            "lora": {**lora, "adapted_kernels": len(kernels)},
            "uplink_bits": bits,
        },
        "pretrained": {"test_accuracy": float(before["accuracy"]),
                       "test_loss": float(before["loss"])},
        "rows": rows,
        "total_wall_s": time.perf_counter() - start,
        "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} "
                   f"device(s), jax {jax.__version__}",
    }
    print(f"\ntotal {result['total_wall_s']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

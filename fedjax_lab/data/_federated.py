"""The flat federated dataset: every example once, clients are contiguous ranges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from fedjax_lab.data import _validate


class FederatedData(NamedTuple):
    """A federated dataset in the flat layout: examples stored once, clients as ranges.

    Client ``i`` owns the examples ``offsets[i]:offsets[i + 1]`` of every array in ``examples``.
    Nothing is padded per client, so a skewed population costs what it holds. Arrays may be
    NumPy (host) or JAX (device) arrays; :func:`fedjax_lab.run_rounds` moves them to the device.

    Attributes:
      examples: dict of arrays ``[num_examples, ...]`` (by convention ``"x"`` inputs and
        ``"y"`` labels).
      offsets: ``int64[num_clients + 1]`` client boundaries, ``offsets[0] == 0``.
      client_names: optional tuple of ``num_clients`` strings (e.g. the ids of a TFF file);
        metadata only, never traced.

    Example:
      >>> import numpy as np
      >>> import fedjax_lab as fl
      >>> data = fl.data.FederatedData.from_client_arrays(
      ...     [{"x": np.ones((3, 2)), "y": np.zeros(3)}, {"x": np.ones((1, 2)), "y": np.ones(1)}])
      >>> data.num_clients, data.num_examples, data.client_sizes.tolist()
      (2, 4, [3, 1])
      >>> data.client(1)["y"].tolist()
      [1.0]
    """

    examples: dict[str, Any]
    offsets: np.ndarray
    client_names: tuple[str, ...] | None = None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_client_arrays(cls, clients: Sequence[Mapping[str, Any]]) -> FederatedData:
        """Builds a dataset from one dict of arrays per client (leading axis = examples)."""
        if len(clients) == 0:
            raise ValueError("clients: need at least one client, got an empty sequence.")
        keys = sorted(clients[0])
        for i, c in enumerate(clients):
            if sorted(c) != keys:
                raise ValueError(
                    f"clients[{i}]: has keys {sorted(c)}, but clients[0] has {keys}; every client "
                    "must hold the same features."
                )
        sizes = np.array([len(np.asarray(c[keys[0]])) for c in clients], dtype=np.int64)
        examples = {k: np.concatenate([np.asarray(c[k]) for c in clients]) for k in keys}
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls.from_offsets(examples, offsets)

    @classmethod
    def from_client_indices(
        cls, examples: Mapping[str, Any], client_indices: Sequence[Sequence[int]]
    ) -> FederatedData:
        """Builds a dataset from a pool of examples and each client's list of example indices.

        This is what partitioners return: ``fl.partition.dirichlet(labels, ...)`` gives the
        index lists. An example may appear in several clients' lists (it is then copied).
        """
        if len(client_indices) == 0:
            raise ValueError("client_indices: need at least one client, got an empty sequence.")
        idx = [np.asarray(ix, dtype=np.int64).reshape(-1) for ix in client_indices]
        flat = np.concatenate(idx)
        n = _num_rows(examples, "examples")
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise ValueError(
                f"client_indices: indices must lie in [0, {n}) (the number of examples); got "
                f"values in [{flat.min()}, {flat.max()}]."
            )
        sizes = np.array([len(ix) for ix in idx], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls.from_offsets({k: np.asarray(v)[flat] for k, v in examples.items()}, offsets)

    @classmethod
    def from_offsets(
        cls,
        examples: Mapping[str, Any],
        offsets: Any,
        client_names: Sequence[str] | None = None,
    ) -> FederatedData:
        """Builds a dataset from flat arrays and client boundaries, checking that they agree."""
        offsets = np.asarray(offsets, dtype=np.int64)
        n = _num_rows(examples, "examples")
        if offsets.ndim != 1 or offsets.size < 2:
            raise ValueError("offsets: need a 1-D array of num_clients + 1 boundaries.")
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"offsets: must rise from 0 to the number of examples ({n}); got "
                f"offsets[0]={offsets[0]}, offsets[-1]={offsets[-1]}."
            )
        if client_names is not None:
            client_names = tuple(str(c) for c in client_names)
            if len(client_names) != offsets.size - 1:
                raise ValueError(
                    f"client_names: got {len(client_names)} names for {offsets.size - 1} clients."
                )
        return cls(dict(examples), offsets, client_names)

    # ----------------------------------------------------------------- views
    @property
    def num_clients(self) -> int:
        return int(len(self.offsets) - 1)

    @property
    def num_examples(self) -> int:
        return int(self.offsets[-1])

    @property
    def client_sizes(self) -> np.ndarray:
        """``int64[num_clients]`` number of examples each client holds."""
        return np.diff(np.asarray(self.offsets))

    def client(self, i: int) -> dict[str, Any]:
        """The examples of client ``i`` as a dict of arrays."""
        if not 0 <= i < self.num_clients:
            raise IndexError(f"i: client index {i} is outside [0, {self.num_clients}).")
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {k: v[lo:hi] for k, v in self.examples.items()}

    def select_clients(self, ids: Sequence[int]) -> FederatedData:
        """A new dataset holding only the clients ``ids``, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        starts, ends = np.asarray(self.offsets)[ids], np.asarray(self.offsets)[ids + 1]
        ranges = [np.arange(s, e) for s, e in zip(starts, ends, strict=True)]
        rows = np.concatenate(ranges or [[]]).astype(np.int64)
        sizes = ends - starts
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        names = None if self.client_names is None else tuple(self.client_names[i] for i in ids)
        return FederatedData(
            {k: np.asarray(v)[rows] for k, v in self.examples.items()}, offsets, names
        )

    # ----------------------------------------------------------------- checks
    def check_keys(self, keys: Sequence[str], *, needed_by: str = "the loss") -> FederatedData:
        """Returns ``self`` if ``examples`` holds every key of ``keys``; else ``ValueError``.

        The message names the missing key, who needs it and the keys the data does hold.

        Example:
          >>> import numpy as np
          >>> data = FederatedData.from_client_arrays([{"x": np.ones((2, 3)), "lbl": np.zeros(2)}])
          >>> try:
          ...     data.check_keys(["x", "y"])
          ... except ValueError as e:
          ...     print(e)  # doctest: +ELLIPSIS
          examples: missing the key 'y' needed by the loss; the data holds ['lbl', 'x']. Rename...
        """
        present = sorted(self.examples)
        for k in keys:
            if k not in self.examples:
                other = next((p for p in present if p not in keys), "...")
                raise ValueError(
                    f"examples: missing the key {k!r} needed by {needed_by}; the data holds "
                    f"{present}. Rename the feature, e.g. FederatedData(dict(examples, "
                    f"{k}=examples.pop({other!r})), offsets)."
                )
        return self

    def check_labels(
        self, num_classes: int, key: str = "y", *, ignore: int | None = None
    ) -> FederatedData:
        """Returns ``self`` if every ``examples[key]`` is an integer label in ``[0, num_classes)``.

        Otherwise raises ``ValueError`` naming the first bad client, the label and the fix:
        out-of-range (``y = 99`` with 10 classes), negative (``y = -1``) and non-integral
        (``y = 2.7``, NaN) labels are all refused, where the loss would silently clamp or wrap
        them. Labels stored as integral floats (``3.0``) and bools are accepted: the losses cast
        them to ``int32`` exactly. ``ignore`` is a value allowed anywhere (the loss's
        ``pad_id``). Works for label arrays of any rank (``[N]`` or per-position ``[N, T]``).

        The scan is ``O(num_examples)`` on the host, once: the verdict is cached per label array
        object, so checking again (another round, another entry point) is free. An array that
        is modified in place after passing is not re-checked; build a new array instead.

        Example:
          >>> import numpy as np
          >>> data = FederatedData.from_client_arrays(
          ...     [{"y": np.array([0, 1])}, {"y": np.array([2, 99])}])
          >>> data.check_labels(100) is data
          True
          >>> try:
          ...     data.check_labels(10)
          ... except ValueError as e:
          ...     print(e)  # doctest: +ELLIPSIS
          examples['y']: client 1 holds the out-of-range label 99 (its example 1; 1 of 4 labels...
        """
        self.check_keys([key], needed_by="a label check")
        _validate.check_int_values(
            self.examples[key], num_classes, name=f"examples[{key!r}]", what="label",
            offsets=self.offsets, client_names=self.client_names, ignore=ignore,
        )
        return self

    def check_example_shape(self, key: str, shape: Sequence[int]) -> FederatedData:
        """Returns ``self`` if one example of ``examples[key]`` has the shape ``shape``.

        The flattened ``(prod(shape),)`` and trailing axes of size 1 are accepted too (the zoo's
        models reshape); any other shape raises ``ValueError`` naming both shapes.

        Example:
          >>> import numpy as np
          >>> data = FederatedData.from_client_arrays([{"x": np.ones((2, 63))}])
          >>> try:
          ...     data.check_example_shape("x", (8, 8, 1))
          ... except ValueError as e:
          ...     print(e)  # doctest: +ELLIPSIS
          examples['x']: one example has shape (63,), but the model was built for (8, 8, 1)...
        """
        self.check_keys([key], needed_by="the model")
        want = tuple(int(d) for d in shape)
        got = tuple(int(d) for d in np.shape(self.examples[key])[1:])
        if not _validate.example_shape_matches(got, want):
            size = int(np.prod(want))
            raise ValueError(
                f"examples[{key!r}]: one example has shape {got}, but the model was built for "
                f"{want} ({size} values); pass examples of shape {want} (or flattened "
                f"({size},)), or build the model with input_shape={got}."
            )
        return self

    def describe(self, label_key: str = "y") -> str:
        """A short summary: clients, examples, client-size quantiles and label skew.

        Label skew is the mean total-variation distance between each client's label histogram
        and the population's (0 = every client has the global label mix, 1 = disjoint labels),
        reported only when ``examples[label_key]`` holds one integer label per example.
        """
        sizes = self.client_sizes
        q = np.percentile(sizes, [0, 10, 50, 90, 100]).round(1) if sizes.size else []
        lines = [
            f"FederatedData: {self.num_clients} clients, {self.num_examples} examples",
            "  features: "
            + ", ".join(f"{k} {np.asarray(v).dtype}{list(np.shape(v)[1:])}"
                        for k, v in self.examples.items()),
            "  client size min/p10/median/p90/max: " + " / ".join(str(v) for v in q),
        ]
        skew = self.label_skew(label_key)
        if skew is not None:
            lines.append(f"  label skew (mean TV distance to the global label mix): {skew:.3f}")
        return "\n".join(lines)

    def label_skew(self, label_key: str = "y") -> float | None:
        """Mean total-variation distance of client label histograms to the global one."""
        y = self.examples.get(label_key)
        if y is None:
            return None
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.size == 0:
            return None
        k = int(y.max()) + 1
        owner = np.repeat(np.arange(self.num_clients), self.client_sizes)
        counts = np.zeros((self.num_clients, k))
        np.add.at(counts, (owner, y), 1.0)
        sizes = counts.sum(1, keepdims=True)
        keep = sizes[:, 0] > 0
        local = counts[keep] / sizes[keep]
        glob = counts.sum(0) / counts.sum()
        return float(0.5 * np.abs(local - glob).sum(1).mean())


def _num_rows(examples: Mapping[str, Any], name: str) -> int:
    if not examples:
        raise ValueError(f"{name}: need at least one feature array, got an empty dict.")
    rows = {k: int(np.shape(v)[0]) for k, v in examples.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{name}: every array needs the same number of rows; got {rows}.")
    return next(iter(rows.values()))

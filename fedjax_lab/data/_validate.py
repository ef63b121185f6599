"""Host-side checks of counts and of dataset contents, run once before anything compiles.

Label checks scan the data (O(num_examples)); their verdict is cached per array object (a
weak reference, so a checked array that is freed leaves the cache), so checking the same
dataset again, every round or from several entry points, costs a dictionary lookup.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

# (kind, id(array), *parameters) -> weak reference to the array that passed.
_PASSED: dict[tuple, weakref.ref] = {}


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is a whole number ``>= minimum``; bools are refused.

    ``True`` is an ``int`` to Python, but never a count: passing it is a bug upstream.

    Example:
      >>> check_count(3, "num_clients")
      3
      >>> try:
      ...     check_count(True, "num_clients")
      ... except ValueError as e:
      ...     print(e)
      num_clients: expected a whole number >= 1, got the bool True; pass an int.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{name}: expected a whole number >= {minimum}, got the bool {value}; pass an int."
        )
    try:
        v = operator.index(value)
    except TypeError:
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            v = int(value)
        else:
            raise ValueError(
                f"{name}: expected a whole number >= {minimum}, got {value!r} "
                f"({type(value).__name__})."
            ) from None
    if v < minimum:
        raise ValueError(f"{name}: expected a whole number >= {minimum}, got {v}.")
    return int(v)


def _cached(kind: str, array: Any, params: tuple) -> bool:
    ref = _PASSED.get((kind, id(array), *params))
    return ref is not None and ref() is array


def _remember(kind: str, array: Any, params: tuple) -> None:
    key = (kind, id(array), *params)
    try:
        _PASSED[key] = weakref.ref(array, lambda _, key=key: _PASSED.pop(key, None))
    except TypeError:  # not weak-referenceable (e.g. a list): checked again next time
        pass


def _scan_ints(values: np.ndarray, upper: int, ignore: int | None) -> dict[str, Any] | None:
    """Where ``values`` are not integers in ``[0, upper)``: the first flat position, why, count.

    ``ignore`` is a value allowed anywhere (a padding id). ``None`` when every value is fine.
    """
    kind = values.dtype.kind
    if kind not in "biuf":
        raise ValueError(f"dtype {values.dtype}, which holds no numbers")
    flat = values.reshape(-1)
    if kind == "b":
        flat = flat.astype(np.int64)
    whole = np.isfinite(flat) & (np.floor(flat) == flat) if kind == "f" else None
    bad = (flat < 0) | (flat >= upper)
    if whole is not None:
        bad |= ~whole
    if ignore is not None:
        bad &= flat != ignore
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    if whole is not None and not whole[i]:
        why = "non-integral"
    else:
        why = "negative" if flat[i] < 0 else "out-of-range"
    largest = flat[i]
    if why == "out-of-range":  # flat[i] is finite, so the finite maximum exists
        largest = flat[np.isfinite(flat)].max() if kind == "f" else flat.max()
    return {"pos": i, "why": why, "count": int(bad.sum()), "size": int(flat.size),
            "value": flat[i].item(), "largest": largest.item()}


def check_int_values(
    values: Any,
    upper: int,
    *,
    name: str,
    what: str,
    offsets: Sequence[int] | np.ndarray,
    client_names: Sequence[str] | None = None,
    ignore: int | None = None,
    bound_name: str = "num_classes",
) -> None:
    """Raises ``ValueError`` unless every value of ``values`` is an integer in ``[0, upper)``.

    Integral floats (``3.0``) pass: the losses cast labels to ``int32``, which keeps them exact.
    The message names the first bad client (its index into ``offsets``), the value and the fix.
    """
    upper = check_count(upper, bound_name)
    params = (upper, ignore)
    if _cached("ints", values, params):
        return
    arr = np.asarray(values)
    try:
        found = _scan_ints(arr, upper, ignore)
    except ValueError as e:
        raise ValueError(
            f"{name}: {what}s must be integers in [0, {upper}), but the array has {e}; convert "
            "it, e.g. np.unique(y, return_inverse=True)[1] for string classes."
        ) from None
    if found is not None:
        row = found["pos"] // max(1, math.prod(arr.shape[1:]))
        offsets = np.asarray(offsets)
        client = int(np.searchsorted(offsets, row, side="right") - 1)
        who = f"client {client}"
        if client_names is not None:
            who += f" ({client_names[client]!r})"
        why, value = found["why"], found["value"]
        where = (
            f"{who} holds the {why} {what} {value!r} (its example {row - int(offsets[client])}; "
            f"{found['count']} of {found['size']} {what}s are bad)"
        )
        if why == "non-integral":
            fix = (
                f"{what}s must be whole numbers in [0, {upper}) (integral floats such as 3.0 "
                "are accepted); re-encode them, e.g. np.unique(y, return_inverse=True)[1]."
            )
        elif why == "negative":
            fix = (
                f"{what}s must lie in [0, {upper}); drop or remap negative {what}s (e.g. -1 "
                "used for 'unknown')."
            )
        else:
            fix = (
                f"{what}s must lie in [0, {upper}) ({bound_name}={upper}); fix or drop those "
                f"examples, or build the model with {bound_name} >= {int(found['largest']) + 1}."
            )
        raise ValueError(f"{name}: {where}; {fix}")
    _remember("ints", values, params)


def example_shape_matches(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether one example of shape ``got`` is what a model built for ``want`` reads.

    The zoo's image models reshape their input, so besides ``want`` itself the flattened
    ``(prod(want),)`` is accepted, and trailing axes of size 1 do not matter (``(8, 8)`` for
    ``(8, 8, 1)``). A model built for flat inputs ``(d,)`` flattens whatever it gets, so any
    example of ``d`` values is accepted. Any other layout with the same number of values
    (``(1, 8, 8)`` for ``(8, 8, 1)``: channels first) is refused: it would be read in the
    wrong order.
    """
    if len(want) == 1 and math.prod(got) == want[0]:
        return True

    def strip(s: tuple[int, ...]) -> tuple[int, ...]:
        while s and s[-1] == 1:
            s = s[:-1]
        return s

    return strip(got) == strip(want) or got == (math.prod(want),)

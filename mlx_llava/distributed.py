"""The ranks of an `mlx.launch` run: the group, rank 0, splitting work and gathering it back.

Every helper takes the group of MLX's distributed backend (`mx.distributed.init()`: ring over
TCP or Thunderbolt, JACCL, MPI; `mlx.launch -n N` starts the ranks). A plain process is a group
of size 1, for which each helper is the identity: one process and N ranks run the same code.
Rank 0 is the one that writes files and prints; the others compute and hand it their results.

Small values travel as JSON bytes through `all_gather` / `all_sum` (every collective here runs
on the CPU stream, as mlx-lm's trainer does for its counts).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Optional, Sequence

import mlx.core as mx

Group = mx.distributed.Group

_world: Optional[Group] = None


def world() -> Group:
    """The group of every rank (`mx.distributed.init()`; size 1 outside `mlx.launch`)."""
    global _world
    if _world is None:
        _world = mx.distributed.init()
    return _world


def rank(group: Optional[Group] = None) -> int:
    return (group or world()).rank()


def size(group: Optional[Group] = None) -> int:
    return (group or world()).size()


def is_main(group: Optional[Group] = None) -> bool:
    """Whether this is rank 0, the rank that writes the output and prints."""
    return rank(group) == 0


def rank_prefix() -> str:
    """`"rank R: "` for messages of a rank of a multi-rank run, else "" (also before the group
    exists, so that error messages never start the backend)."""
    if _world is None or _world.size() == 1:
        return ""
    return f"rank {_world.rank()}: "


def main_print(message: str) -> None:
    """Print a line on stderr from rank 0 only (the others would repeat it)."""
    if is_main():
        print(message, file=sys.stderr, flush=True)


def barrier(group: Optional[Group] = None) -> None:
    """Wait until every rank has come here."""
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def part(n: int, group: Optional[Group] = None) -> slice:
    """This rank's contiguous share of `n` items: shares differ by at most one item, the first
    ranks taking the extra ones, and may be empty when there are fewer items than ranks."""
    base, extra = divmod(n, size(group))
    r = rank(group)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def shard(items: Sequence, group: Optional[Group] = None) -> Sequence:
    """This rank's contiguous share of `items` (see `part`)."""
    return items[part(len(items), group)]


def sum_values(values: Sequence[float], group: Optional[Group] = None) -> list[float]:
    """Numbers summed over the ranks (float32), on every rank."""
    if size(group) == 1:
        return [float(v) for v in values]
    total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=group, stream=mx.cpu)
    return total.tolist()


def _to_bytes(obj: Any) -> mx.array:
    return mx.array(memoryview(json.dumps(obj).encode("utf-8")), dtype=mx.uint8)


def _from_bytes(data: mx.array) -> Any:
    return json.loads(bytes(memoryview(data)).decode("utf-8"))


def gather(obj: Any, group: Optional[Group] = None) -> list:
    """Every rank's `obj` (anything JSON can carry), in rank order, on every rank."""
    if size(group) == 1:
        return [obj]
    data = _to_bytes(obj)
    lengths = mx.distributed.all_gather(mx.array([data.size]), group=group, stream=mx.cpu)
    lengths = lengths.tolist()
    padded = mx.zeros((max(lengths),), dtype=mx.uint8)
    padded[: data.size] = data
    rows = mx.distributed.all_gather(padded[None], group=group, stream=mx.cpu)
    return [_from_bytes(row[:n]) for row, n in zip(rows, lengths)]


def broadcast(obj: Any, group: Optional[Group] = None) -> Any:
    """Rank 0's `obj` (anything JSON can carry) on every rank; the others pass anything."""
    if size(group) == 1:
        return obj
    main = is_main(group)
    data = _to_bytes(obj if main else None)
    length = mx.array(data.size if main else 0)
    n = mx.distributed.all_sum(length, group=group, stream=mx.cpu).item()
    buffer = data if main else mx.zeros((n,), dtype=mx.uint8)
    return _from_bytes(mx.distributed.all_sum(buffer, group=group, stream=mx.cpu))


def broadcast_arrays(arrays: dict[str, mx.array], group: Optional[Group] = None) -> dict:
    """Rank 0's arrays on every rank, by name. The others pass arrays of the same names, shapes
    and types (a flat dict, as `tree_flatten` makes: its order may differ between ranks)."""
    if size(group) == 1:
        return arrays
    layout = "".join(f"{k}{arrays[k].shape}{arrays[k].dtype};" for k in sorted(arrays))
    check_same(hashlib.sha1(layout.encode()).hexdigest()[:16], "array layout", group)
    main = is_main(group)
    out = {}
    for name in sorted(arrays):
        x = arrays[name]
        out[name] = mx.distributed.all_sum(
            x if main else mx.zeros_like(x), group=group, stream=mx.cpu
        )
    mx.eval(out)
    return out


def check_same(value: Any, what: str, group: Optional[Group] = None) -> None:
    """Raise ValueError unless every rank has the same `value` (JSON), naming the first that
    differs from rank 0: the ranks of a run must read the same model, data and pictures."""
    values = gather(value, group)
    for r, v in enumerate(values[1:], start=1):
        if v != values[0]:
            raise ValueError(
                f"rank {r} disagrees with rank 0 on the {what} ({v} vs {values[0]}): every "
                "machine needs the same files at the same paths"
            )

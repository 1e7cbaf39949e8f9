"""Whether the Ray backend's node actors fit on a cluster, and if not, why and what to change.

A node actor takes 1 CPU per worker (``num_cpus=len(workers)``) for the engine's whole life,
and every node actor runs at once: a cluster whose nodes cannot hold them all leaves Ray
waiting on an actor it never places. These checks run before any actor is created and
while the pool waits for its actors, so such a cluster fails in seconds with the numbers.

Pure functions of CPU counts; no Ray here.
"""

from __future__ import annotations

import math
from collections import Counter


def actor_sizes(num_workers: int, workers_per_node: int) -> list[int]:
    """The CPUs each node actor asks for: ``workers_per_node`` each, the last one the rest.

    Example:
        >>> actor_sizes(5, 2)
        [2, 2, 1]
    """
    full, rest = divmod(num_workers, workers_per_node)
    return [workers_per_node] * full + ([rest] if rest else [])


def first_fit(sizes: list[int], capacities: list[float]) -> int:
    """How many of ``sizes`` (largest first) fit at once on nodes of ``capacities`` CPUs,
    each on the first node with room. Exact for the pool's sizes (all equal but a smaller
    last one): the equal ones fill ``floor(cpus / size)`` per node in any placement, and a
    node left partly filled has room for the smaller one.

    Example:
        >>> first_fit([2, 2, 2], [2, 3])
        2
    """
    free = sorted(capacities, reverse=True)
    placed = 0
    for size in sorted(sizes, reverse=True):
        for i, cpus in enumerate(free):
            if cpus >= size:
                free[i] -= size
                placed += 1
                break
    return placed


def _nodes(capacities: list[float]) -> str:
    """The alive nodes grouped by CPUs (a cluster of hundreds stays one short line)."""
    if not capacities:
        return "none"
    groups = sorted(Counter(capacities).items(), key=lambda kv: -kv[0])
    return ", ".join(f"{n} with {cpus:g} CPU{'' if cpus == 1 else 's'}" for cpus, n in groups)


def fits(num_workers: int, workers_per_node: int, capacities: list[float]) -> bool:
    """Whether every node actor fits at once on nodes of ``capacities`` CPUs."""
    sizes = actor_sizes(num_workers, workers_per_node)
    return first_fit(sizes, capacities) == len(sizes)


def placement_problem(
    num_workers: int, workers_per_node: int, capacities: list[float]
) -> str | None:
    """Why node actors of ``workers_per_node`` workers for ``num_workers`` workers cannot all
    run at once on alive Ray nodes of ``capacities`` CPUs (their totals, as ``ray.nodes()``
    reports them), with the fix; None when they can.

    Example:
        >>> print(placement_problem(2, 2, [1.0, 1.0]))  # doctest: +NORMALIZE_WHITESPACE
        cannot place the Ray backend's node actors: 2 workers at workers_per_node=2 make 1
        node actor of 2 CPUs, 1 CPU per worker, all running at once; no alive Ray node has 2
        CPUs (the largest has 1). Alive Ray nodes (total CPUs, from ray.nodes()): 2 with 1
        CPU. Fix: set workers_per_node=1, or give each Ray node at least 2 CPUs (ray start
        --num-cpus=2).
    """
    per = workers_per_node
    sizes = actor_sizes(num_workers, per)
    placed = first_fit(sizes, capacities)
    if placed == len(sizes):
        return None
    count = f"{len(sizes)} node actor{'s' if len(sizes) > 1 else ''}"
    each = f"{sizes[0]} CPUs" + (f" (the last {sizes[-1]})" if sizes[-1] != sizes[0] else "")
    demand = (
        f"{num_workers} workers at workers_per_node={per} make {count} of {each}, 1 CPU per "
        f"worker, all running at once"
    )
    largest = max(capacities, default=0.0)
    if sizes[0] > largest:
        problem = f"no alive Ray node has {sizes[0]} CPUs (the largest has {largest:g})"
        more = f"give each Ray node at least {sizes[0]} CPUs (ray start --num-cpus={sizes[0]})"
    else:
        left = len(sizes) - placed
        problem = (
            f"together they need {sum(sizes)} CPUs and the alive Ray nodes hold only {placed} "
            f"of them at once ({sum(capacities):g} CPUs in all)"
        )
        more = (
            f"add {left} Ray node{'s' if left > 1 else ''} of at least {sizes[0]} CPUs (ray "
            f"start --num-cpus={sizes[0]})"
        )
    # The largest workers_per_node below this one that fits. A smaller one need not: nodes
    # of 3 CPUs hold one actor of 3 each, but only one of 2.
    lower = next((p for p in range(per - 1, 0, -1) if fits(num_workers, p, capacities)), None)
    most = sum(math.floor(c) for c in capacities)
    if lower is not None:
        fix = f"set workers_per_node={lower}, or {more}"
    elif most:  # even one worker per actor does not fit: more workers than whole CPUs
        fix = f"use at most {most} workers (num_workers) with workers_per_node=1, or {more}"
    else:
        fix = more
    return (
        f"cannot place the Ray backend's node actors: {demand}; {problem}. Alive Ray nodes "
        f"(total CPUs, from ray.nodes()): {_nodes(capacities)}. Fix: {fix}."
    )

"""The Ray backend: the engine's workers spread over Ray nodes, behind the pool interface.

:class:`RayPool` stands where :class:`~pipeline.backends.local.WorkerPool` stands for the engine. On
each node a :class:`~pipeline.backends.ray.node.NodeActor` runs that node's workers with a local
pool and its own shared memory. The driver keeps a *mirror* of the engine's layout, so the
engine, the stage batcher, the recorder and the CUDA path read and write exactly what they
do locally:

* a command: the engine writes action chunks and control rows into the mirror, and the
  pool sends each node, in one call, its rows of them with the frames for its workers;
* a reply: a node pushes a stage's replies from all its workers in one message, with the
  slot rows they wrote, over a TCP connection of its own (the reply channel: 4.5-5x faster
  per round trip than a Ray call, ``bench.py ray --part channel``), and the pool copies
  them into the mirror before the engine sees the frames. A closed channel means the node
  is lost; a node silent for ``hang_timeout_s`` plus a grace period is reported stuck.

Failures come back as the local pool's errors (a worker died, raised, or is stuck, with its
stack), and a node whose actor is lost raises :class:`NodeLostError` for all its workers.
Both are replaced under the engine's one restart budget: a worker by its node, a node by a
new actor on the same Ray node if it is alive, else on another.

Ray is imported only here, and only when ``backend="ray"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from envs.spec import EnvSpec
from pipeline.backends.base import PoolBase
from pipeline.backends.budget import RestartBudget
from pipeline.backends.ray.handles import (
    NodeHandle,
    NodeRing,
    await_death,
    import_ray,
    raise_payload,
)
from pipeline.backends.ray.node import NodeActor, stage_rows
from pipeline.backends.ray.placement import actor_sizes, placement_problem
from pipeline.errors import (
    EngineError,
    EngineTimeout,
    EnvError,
    NodeLostError,
    PlacementError,
    WorkerDiedError,
    WorkerStuckError,
)
from pipeline.runtime import protocol as P
from pipeline.runtime.layout import Layout, SharedBuffers
from pipeline.runtime.spans import SpanRing

log = logging.getLogger("pipeline")

# A node whose poll has not come back for this long past the hang timeout is not answering
# (its own watchdog would have reported a stuck worker by then).
_NODE_GRACE_S = 10.0
# A node actor Ray has not placed for this long is logged (CPUs another job holds may free
# up, so it is waited for until the start timeout).
_PLACEMENT_WARN_S = 10.0


def _cpus(node: dict) -> float:
    """A Ray node's CPUs in total, as ``ray.nodes()`` reports them (none: 0)."""
    return float(node["Resources"].get("CPU", 0.0))


class RayPool(PoolBase):
    """The engine's workers on Ray nodes, ``workers_per_node`` to a node.

    Example:
        >>> pool = RayPool("toy", {}, env_ids=[[0, 2], [1, 3]], env_stages=[(0,), (1,), (0,), (1,)],
        ...                auto_reset=True, env_name="toy", workers_per_node=1)
        >>> spec = pool.start(lambda spec: Layout(spec, 4, 8, 2), start_timeout_s=60)
        >>> pool.close()
    """

    def __init__(
        self,
        env: str | Callable[..., Any],
        env_kwargs: dict,
        *,
        env_ids: list[list[int]],
        env_stages: list[tuple[int, ...]],
        auto_reset: bool,
        env_name: str,
        workers_per_node: int,
        ray_address: str | None = None,
        pin_workers: bool = False,
        profile: bool = False,
        max_restarts: int = 0,
        hang_timeout_s: float = 60.0,
    ) -> None:
        ray = self.ray = import_ray()
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
            self._owns_ray = True
        elif ray_address is not None:
            log.info("Ray is already initialized: ray_address=%r is not used", ray_address)
        self.env, self.env_kwargs, self.env_name = env, env_kwargs, env_name
        self.env_ids, self.env_stages, self.auto_reset = env_ids, env_stages, auto_reset
        self.num_workers = len(env_ids)
        self.pin_workers, self.profile, self.hang_timeout_s = pin_workers, profile, hang_timeout_s
        self.budget = RestartBudget(max_restarts, self.num_workers)
        self.rows = stage_rows(env_ids, env_stages)
        self.generation = [0] * self.num_workers
        self.inbox: list[deque] = [deque() for _ in range(self.num_workers)]
        per = self.workers_per_node = workers_per_node
        try:
            # Before any actor is created: Ray leaves one that no node can hold pending,
            # without an error, until the start timeout.
            placement = self._ray_nodes(max(actor_sizes(self.num_workers, per)))
        except BaseException:
            self.close()  # shuts Ray down if this pool started it
            raise
        self.nodes = [
            NodeHandle(n, list(range(n * per, min((n + 1) * per, self.num_workers))), node_id)
            for n, node_id in enumerate(
                placement[i % len(placement)] for i in range(math.ceil(self.num_workers / per))
            )
        ]
        self.node_of = [w // per for w in range(self.num_workers)]
        self.shm: SharedBuffers | None = None
        self.spec: EnvSpec | None = None

    def _ray_nodes(self, cpus: int) -> list[str]:
        """The alive Ray nodes with ``cpus`` CPUs, to place a node actor of ``cpus`` workers
        on: other nodes first (the driver's node runs inference), then the driver's own.

        Raises:
            PlacementError: the alive nodes cannot hold every node actor at once.
        """
        alive = self._alive()
        self._check_placement(alive)
        here = self.ray.get_runtime_context().get_node_id()
        fit = [n for n in alive if _cpus(n) >= cpus]
        fit.sort(key=lambda n: (n["NodeID"] == here, n["NodeManagerAddress"], n["NodeID"]))
        return [n["NodeID"] for n in fit]

    def _alive(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n["Alive"]]

    def _check_placement(self, alive: list[dict]) -> None:
        """Raise :class:`PlacementError` if nodes ``alive`` cannot hold every node actor at
        once (by their total CPUs: what other jobs hold now may be freed)."""
        problem = placement_problem(
            self.num_workers, self.workers_per_node, [_cpus(n) for n in alive]
        )
        if problem is not None:
            raise PlacementError(problem)

    def _await_placement(self, nodes: list[NodeHandle], timeout: float) -> None:
        """Return once Ray has placed the actors of ``nodes``. Ray says nothing of an actor
        it cannot place: every second this checks that the alive nodes still hold every
        node actor (one may have left since the pool checked), and past ``timeout`` it
        names what it waited for rather than let a node's start time out later."""
        ray = self.ray
        pending = {n.actor.__ray_ready__.remote(): n for n in nodes}
        t0, warned = time.monotonic(), False
        while True:
            ready, _ = ray.wait(
                list(pending), num_returns=len(pending), timeout=1.0, fetch_local=False
            )
            for ref in ready:  # placed (or failed to start: the node's first call says so)
                pending.pop(ref).placed = True
            if not pending:
                return
            self._check_placement(self._alive())
            waited = time.monotonic() - t0
            if waited > timeout or (waited > _PLACEMENT_WARN_S and not warned):
                free = ray.available_resources().get("CPU", 0.0)
                total = ray.cluster_resources().get("CPU", 0.0)
                names = ", ".join(f"{n.index} ({len(n.workers)} CPUs)" for n in pending.values())
                why = (
                    f"Ray has not placed node actor(s) {names} in {waited:.0f} s: the alive "
                    f"Ray nodes can hold every node actor, but {free:g} of the cluster's "
                    f"{total:g} CPUs are free (ray.available_resources()); other actors or "
                    f"tasks hold the rest"
                )
                if waited > timeout:
                    raise EngineTimeout(
                        f"{why}. Free them, run fewer workers (num_workers), or add Ray nodes"
                    )
                log.warning("%s; waiting up to %.0f s", why, timeout)
                warned = True

    # -- start-up ----------------------------------------------------------------------------
    def _new_actor(self, node: NodeHandle):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Every call runs in the default group's one thread, in the order it was sent; the
        # replies come back over the node's channel, from a thread of its own.
        actor_cls = self.ray.remote(NodeActor).options(
            num_cpus=len(node.workers),
            # soft: a replacement lands elsewhere when the node is gone.
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.ray_node_id, soft=True),
            name=None,
        )
        node.placed = False
        node.actor = actor_cls.remote(
            node.index, self.env, self.env_kwargs, self.env_ids, self.env_stages,
            self.auto_reset, self.env_name, workers=node.workers,
            pin_workers=self.pin_workers, profile=self.profile,
            hang_timeout_s=self.hang_timeout_s,
        )  # fmt: skip
        node.commands = 0
        self._close_channel(node)

    def _get(self, node: NodeHandle, ref, timeout: float, doing: str):
        """``ray.get`` of one call on ``node``; a lost actor or a timeout raise engine errors,
        an error payload is raised as the error it names."""
        ray = self.ray
        try:
            out = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise EngineTimeout(
                f"node {node.index} (workers {node.workers}) did not finish {doing} within "
                f"{timeout:.0f} s",
                worker=node.workers[0],
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise self._lost(node, doing, exc) from None
        if isinstance(out, tuple) and out[:1] == ("error",):
            raise_payload(out[1:])
        return out

    def _lost(self, node: NodeHandle, doing: str, exc: BaseException) -> NodeLostError:
        # Ray's message opens with what happened and ends with the cause (an exception in
        # the actor's creation, an OOM kill, ...): keep both ends.
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
        return NodeLostError(
            f"node {node.index} (Ray node {node.ray_node_id[:12]}, workers {node.workers}) "
            f"was lost while {doing}: {why}",
            node=node.index,
            workers=node.workers,
        )

    def start(self, make_layout: Callable[[EnvSpec], Layout], start_timeout_s: float) -> EnvSpec:
        """Start every node's workers (in parallel), agree on the spec, create the mirror
        and every node's memory. On failure everything started is stopped."""
        try:
            for node in self.nodes:
                self._new_actor(node)
            hellos = [n.actor.hello.remote(start_timeout_s) for n in self.nodes]
            self._await_placement(self.nodes, start_timeout_s)
            specs = [
                self._hello_or_restart(n, ref, start_timeout_s)
                for n, ref in zip(self.nodes, hellos, strict=True)
            ]
            if any(repr(s) != repr(specs[0]) for s in specs):
                raise EngineError(f"nodes disagree on the env spec: {specs}")
            self.spec = specs[0]
            self.layout = make_layout(self.spec)
            self.shm = SharedBuffers.create(self.layout)
            if self.profile:
                self.shm.arrays["profile_on"][0] = 1
            for node in self.nodes:
                self._attach(node, start_timeout_s, None)
        except BaseException:
            self.close()
            raise
        return self.spec

    def _hello_or_restart(self, node: NodeHandle, ref, timeout: float) -> EnvSpec:
        """The env spec of ``node``'s workers. A node whose start fails (a worker's env
        factory raised or its process died, or the actor was lost) starts again while the
        restart budget lasts, as a local worker does; the failure is charged to the worker
        named. The whole node restarts: its pool closed every worker on the error."""
        while True:
            try:
                return self._get(node, ref, timeout + 60, "creating its envs")
            except (EnvError, WorkerDiedError) as exc:
                w = exc.worker if exc.worker is not None else node.workers[0]
                self.budget.charge(w, exc, -1, self.env_ids[w])  # re-raises when spent
                self._restart_actor(node, timeout)
                ref = node.actor.hello.remote(timeout)

    def _restart_actor(self, node: NodeHandle, timeout: float) -> None:
        """Kill ``node``'s actor and start a new one, on the same Ray node if it is alive;
        return once Ray has placed it."""
        with contextlib.suppress(Exception):
            self.ray.kill(node.actor)
        alive = {n["NodeID"] for n in self._alive()}
        if node.ray_node_id not in alive:
            node.ray_node_id = self._ray_nodes(len(node.workers))[0]
        self._new_actor(node)
        self._await_placement([node], timeout)

    def _attach(self, node: NodeHandle, timeout: float, slots: dict | None) -> None:
        lay = self.layout
        ref = node.actor.attach.remote(lay.num_envs, lay.chunk_len, lay.num_workers, timeout, slots)
        node.pids = self._get(node, ref, timeout + 60, "attaching shared memory")
        self._open_channel(node)

    def _open_channel(self, node: NodeHandle) -> None:
        """Connect to the node's reply channel (on the node's own address)."""
        from multiprocessing.connection import Client

        key = os.urandom(16)
        host = self._addresses()[node.ray_node_id]
        ref = node.actor.open_channel.remote(host, key)
        address = self._get(node, ref, 60, "opening its reply channel")
        node.conn = Client(tuple(address), authkey=key)
        node.heard_at = time.monotonic()

    def _addresses(self) -> dict[str, str]:
        """Ray node id -> the address its raylet reports."""
        return {n["NodeID"]: n["NodeManagerAddress"] for n in self.ray.nodes()}

    @staticmethod
    def _close_channel(node: NodeHandle) -> None:
        conn, node.conn = node.conn, None
        if conn is not None:
            conn.close()

    # -- commands ----------------------------------------------------------------------------
    def send_all(self, frames: dict[int, list[P.Frame]], doing: str) -> EngineError | None:
        """One call per node: its workers' frames and its rows of the control arrays."""
        a = self.shm.arrays
        by_node: dict[int, dict[int, list[tuple]]] = {}
        for w, fs in frames.items():
            by_node.setdefault(self.node_of[w], {})[w] = fs
        profile_on = bool(a["profile_on"][0])
        for n, mine in by_node.items():
            node = self.nodes[n]
            rows = np.concatenate([self.rows[(w, f[1])] for w, fs in mine.items() for f in fs])
            control = {k: a[k][rows] for k in self.layout.control_keys}
            node.actor.command.remote(node.commands, mine, rows, control, profile_on)
            node.commands += 1
        return None

    def send(self, w: int, frames: list[P.Frame], doing: str) -> None:
        self.send_all({w: frames}, doing)

    def wake_order(self, workers: list[int]) -> list[int]:
        return workers

    # -- replies -----------------------------------------------------------------------------
    def _pump(self, timeout: float | None, doing: str) -> None:
        """Take every node reply that is in; with none in, wait up to ``timeout`` seconds
        for one (``None``: until one comes)."""
        from multiprocessing.connection import wait

        live = [n for n in self.nodes if n.conn is not None]
        if not live:
            return
        conns = [n.conn for n in live]
        ready = wait(conns, timeout=0)
        if not ready and timeout != 0:
            ready = wait(conns, timeout=timeout)
        for node in live:
            if node.conn in ready:
                self._apply(node, doing)
            elif time.monotonic() - node.heard_at > self.hang_timeout_s + _NODE_GRACE_S:
                raise WorkerStuckError(
                    f"node {node.index} (workers {node.workers}) has not answered for "
                    f"{time.monotonic() - node.heard_at:.0f} s while {doing}",
                    worker=node.workers[0],
                )

    def _apply(self, node: NodeHandle, doing: str) -> None:
        try:
            replies, data, error = node.conn.recv()
        except (EOFError, OSError) as exc:  # the actor died, or its node went away
            self._close_channel(node)
            raise self._lost(node, doing, exc) from None
        node.heard_at = time.monotonic()
        a = self.shm.arrays
        for (w, gen, frame), rows_data in zip(replies, data, strict=True):
            if gen != self.generation[w]:
                continue  # sent by a worker replaced since
            slot, rows = frame.slot, self.rows[(w, frame.stage)]
            for key, value in rows_data.items():
                a[key][slot, rows] = value
            self.inbox[w].append(frame)
        if error is not None:  # the node sends nothing more until the worker is replaced
            raise_payload(error)

    def drain(self, doing: str) -> None:
        self._pump(0, doing)

    def ready(self, workers: list[int], match: Callable[[tuple], bool], doing: str) -> bool:
        """Whether each of ``workers`` has a reply that ``match`` accepts (never blocks)."""
        self._pump(0, doing)
        return all(any(match(f) for f in self.inbox[w]) for w in workers)

    def collect(
        self, workers: list[int], match: Callable[[tuple], bool], hang_timeout: float, doing: str
    ) -> None:
        """Block until each of ``workers`` has the reply ``match`` accepts, and take those
        replies (the nodes' watchdogs report a stuck worker)."""
        while True:
            need = [w for w in workers if not any(match(f) for f in self.inbox[w])]
            if not need:
                break
            self._pump(min(1.0, hang_timeout), doing)
        for w in workers:
            box = self.inbox[w]
            box.remove(next(f for f in box if match(f)))
            self.budget.served(w)

    def wait_any(
        self, workers: list[int], timeout: float | None, hang_timeout: float, doing: str
    ) -> None:
        """Read every reply already in; if none of ``workers`` has one, wait until one
        arrives or ``timeout`` seconds pass (``None``: no limit)."""
        self._pump(0, doing)
        deadline = None if timeout is None else time.monotonic() + timeout
        while timeout != 0 and not any(self.inbox[w] for w in workers):
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            self._pump(min(1.0, left), doing)

    # -- failures ----------------------------------------------------------------------------
    def replace(self, w: int, exc: BaseException, start_timeout_s: float) -> list[int]:
        """Replace worker ``w`` on its node, or the whole node when its actor was lost (one
        restart of the budget either way). Returns the workers replaced."""
        node = self.nodes[self.node_of[w]]
        if isinstance(exc, NodeLostError):
            self.budget.charge(w, exc, -1, sum((self.env_ids[x] for x in node.workers), []))
            self._replace_node(node, start_timeout_s)
            return list(node.workers)
        pid = node.pids[node.workers.index(w)] if node.pids else -1
        self.budget.charge(w, exc, pid, self.env_ids[w])
        self.generation[w] = self._get(
            node, node.actor.respawn.remote(w, start_timeout_s), start_timeout_s + 60,
            f"replacing worker {w}",
        )  # fmt: skip
        self.inbox[w].clear()
        node.pids = self._get(node, node.actor.pids.remote(), 60, "listing its workers")
        node.heard_at = time.monotonic()  # the node resumed its replies
        return [w]

    def _replace_node(self, node: NodeHandle, timeout: float) -> None:
        self._restart_actor(node, timeout)
        spec = self._get(node, node.actor.hello.remote(timeout), timeout + 60, "creating its envs")
        if repr(spec) != repr(self.spec):
            raise EngineError(f"replacement node {node.index} has another env spec: {spec}")
        # The new node's memory starts as the mirror's rows of its envs, as a replaced local
        # worker finds the shared memory its predecessor left.
        envs = np.sort(np.concatenate([self.env_ids[w] for w in node.workers]))
        a = self.shm.arrays
        slots = {k: a[k][:, envs] for k in self.layout.slot_keys}
        self._attach(node, timeout, slots)
        for w in node.workers:
            self.inbox[w].clear()
            self.generation[w] = 0

    # -- profiling and shutdown ---------------------------------------------------------------
    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids]

    def local_pids(self) -> list[int | None]:
        """Per worker, its pid if its node runs on this machine (same address as the
        driver), else None: a pid from another machine names some other process here."""
        here = self.driver_address
        nodes = self.placement()
        return [pid if n["address"] == here else None for n in nodes for pid in n["pids"]]

    @functools.cached_property
    def driver_address(self) -> str:
        """The address of the driver's machine, as Ray's nodes report theirs."""
        return self.ray.util.get_node_ip_address()

    def placement(self) -> list[dict]:
        """Where each node runs: its Ray node id and address, its workers and their pids."""
        address = self._addresses()
        return [
            {
                "node": n.index,
                "ray_node_id": n.ray_node_id,
                "address": address.get(n.ray_node_id),
                "workers": list(n.workers),
                "pids": list(n.pids),
            }
            for n in self.nodes
        ]

    def worker_rings(self) -> list[SpanRing]:
        """Each worker's span ring, read from its node now (a snapshot)."""
        a = self.shm.arrays
        ray = self.ray
        got = ray.get([n.actor.rings.remote() for n in self.nodes])
        out: list[SpanRing] = []
        for node, rings in zip(self.nodes, got, strict=True):
            for w in node.workers:
                buf, head = rings[w]
                a["spans"][w] = buf
                a["span_head"][w][0] = head
        for w in range(self.num_workers):
            node = self.nodes[self.node_of[w]]
            clear = functools.partial(node.actor.clear_ring.remote, w)
            out.append(NodeRing(a["spans"][w], a["span_head"][w], clear))
        return out

    def close(self) -> None:
        """Stop every node's workers, end the actors, release the mirror, and shut Ray down
        if this pool started it. Idempotent."""
        ray = getattr(self, "ray", None)
        nodes = [n for n in getattr(self, "nodes", []) if n.actor is not None]
        if ray is not None and nodes and ray.is_initialized():
            # An actor Ray never placed has no workers to stop; a call to it would wait out
            # the 10 s.
            refs = [n.actor.close.remote() for n in nodes if n.placed]
            with contextlib.suppress(Exception):
                if refs:
                    ray.wait(refs, num_returns=len(refs), timeout=10)
            for n in nodes:
                with contextlib.suppress(Exception):
                    ray.kill(n.actor)
            for n in nodes:
                await_death(ray, n.actor, deadline=time.monotonic() + 10)
                n.actor = None
                self._close_channel(n)
        shm, self.shm = getattr(self, "shm", None), None
        if shm is not None:
            shm.close()
        if getattr(self, "_owns_ray", False) and ray is not None:
            self._owns_ray = False
            ray.shutdown()

    def __repr__(self) -> str:
        return f"RayPool({len(self.nodes)} nodes, {self.num_workers} workers, pid {os.getpid()})"

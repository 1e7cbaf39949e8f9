"""The reference GRPO trainer on the engine: the learning demonstration, and async training
(rollouts overlapped with training).

    python bench.py training --part demo        # tabletop/reach, 1 camera: warm start + GRPO
    python bench.py training --part async     # synchronous vs overlapped, simulated GPU
    python bench.py training --part async-cpu # the same with TinyVLA on this CPU (toy reach)
    python bench.py training --part recheck --out DIR  # a demo's checkpoints on fresh seeds
    python bench.py training --part pixels-bc   # cloned from pixels: held-out cross-entropy
    python bench.py training --part perception --vision film --lr 2e-4   # where things are
    python bench.py training --part gradient-noise --out DIR  # how much of a GRPO step is noise

``demo`` runs ``python -m trainer``'s defaults for ``--minutes`` of GRPO and prints held-out
success before and after, with the curve written to ``--out``.

``async`` measures time per iteration, synchronous against overlapped, in one run:
``LatencyPolicy`` holds a simulated device for inference and for a simulated training step,
and the env workers burn real CPU. Three set-ups: synchronous; overlapped with rollout
inference and training on *one* device (they queue for it); overlapped with the rollout on
its own device (a second GPU). ``async-cpu`` runs the real trainer (TinyVLA, toy reach)
both ways, where training, inference and the workers share this machine's cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time

from pipeline import RolloutEngine
from pipeline.policies import LatencyPolicy
from pipeline.policies.latency import SimulatedDevice
from trainer.grpo import evaluate
from trainer.loop import TrainConfig, load_checkpoint, run_iterations, toy_reach_config, train

TOY_REACH = {"task": "reach", "state_dim": 8, "episode_len": 32, "step_cost_us": 1000}


def async_simulated(iterations: int, train_per_item_ms: float) -> None:
    cfg = toy_reach_config(
        env_kwargs=TOY_REACH,
        chunk_len=8,
        num_envs=16,
        groups=8,
        group_size=4,
        max_refills=0,  # equal work per iteration: no refills
        iterations=iterations,
    )
    rows = cfg.groups * cfg.group_size * 4  # 32 episodes x 4 decisions
    print(
        f"toy reach, 1 ms CPU per step, chunk 8, 16 envs, 2 workers, 2 stages; {cfg.groups}x"
        f"{cfg.group_size} episodes per iteration; LatencyPolicy inference 10 ms + 1 ms/item, "
        f"training step 40 ms + {train_per_item_ms} ms x {rows} rows = "
        f"{40 + train_per_item_ms * rows:.0f} ms"
    )
    results = {}
    for name, async_rollouts, own_device in (
        ("synchronous", False, False),
        ("overlapped, one device", True, False),
        ("overlapped, two devices", True, True),
    ):
        policy = LatencyPolicy(
            state_dim=8,
            chunk_len=8,
            base_ms=10,
            per_item_ms=1,
            train_base_ms=40,
            train_per_item_ms=train_per_item_ms,
        )
        rollout = copy.deepcopy(policy) if async_rollouts else policy
        if own_device:
            rollout.device_sim = SimulatedDevice()
        run_cfg = dataclasses.replace(cfg, async_rollouts=async_rollouts)
        with RolloutEngine(
            "toy", rollout, num_envs=16, num_workers=2, num_stages=2, env_kwargs=TOY_REACH
        ) as engine:
            engine.collect_episodes(cfg.groups, cfg.group_size)  # warm-up
            t0 = time.perf_counter()
            step = policy.train_step
            update = lambda batch, progress, s=step: s(rows) or {}  # noqa: E731
            recs = run_iterations(engine, policy, update, run_cfg)
            wall = time.perf_counter() - t0
        per_it = [b["wall_s"] - a["wall_s"] for a, b in zip(recs, recs[1:], strict=False)]
        results[name] = statistics.median(per_it)
        wait = 1000 * statistics.median(r["rollout_s"] for r in recs)
        trained = 1000 * statistics.median(r["train_s"] for r in recs)
        print(
            f"  {name:<26} {1000 * results[name]:7.0f} ms/iteration (median of {len(per_it)}),"
            f" rollout wait {wait:5.0f} ms, train {trained:4.0f} ms; {wall:.1f} s",
            flush=True,
        )
    base = results["synchronous"]
    for name, v in results.items():
        print(f"  {name:<26} {base / v:5.2f}x iterations/s of synchronous")


def async_cpu(iterations: int) -> None:
    print(
        "TinyVLA-tiny GRPO on toy reach (1 ms CPU per step), 8 envs, 2 workers; inference, "
        "training and the workers share this machine's cores"
    )
    for async_rollouts in (False, True):
        cfg = toy_reach_config(
            env_kwargs=TOY_REACH,
            iterations=iterations,
            eval_every=max(1, iterations // 4),
            async_rollouts=async_rollouts,
        )
        curve = train(cfg, log=lambda m: None)
        its = curve["iterations"]
        per_it = [b["wall_s"] - a["wall_s"] for a, b in zip(its, its[1:], strict=False)]
        evals = ", ".join(
            f"{e['greedy']:.2f}/{e['sampled']:.2f}@{e['wall_s']:.0f}s" for e in curve["evals"]
        )
        print(
            f"  {'async' if async_rollouts else 'synchronous':<12} "
            f"{1000 * statistics.median(per_it):6.0f} ms/iteration (median), "
            f"held-out success greedy/sampled at training wall time: {evals}",
            flush=True,
        )


def demo(minutes: float, out: str) -> None:
    cfg = TrainConfig(minutes=minutes, out=out)
    t0 = time.perf_counter()
    curve = train(cfg, log=lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True))
    first, last = curve["evals"][0], curve["evals"][-1]
    its = curve["iterations"]
    print(
        f"after {len(its)} iterations ({last['wall_s'] / 60:.1f} min of GRPO, "
        f"{last['env_steps']} env steps):"
    )
    for metric in ("greedy", "sampled"):
        best = max(curve["evals"], key=lambda e, m=metric: e[m])
        print(
            f"  held-out success, {metric}: warm start {first[metric]:.2f} -> "
            f"{last[metric]:.2f} ({100 * (last[metric] - first[metric]):+.0f} points; best "
            f"{best[metric]:.2f} at iteration {best['iteration']})"
        )
    for key in ("rollout_s", "train_s", "sync_s"):
        print(f"  median {key}: {statistics.median(r[key] for r in its):.2f}")
    print(f"curve: {out}/curve.json, {out}/curve.png")


def _saved_config(out: str) -> tuple[TrainConfig, dict]:
    """The config a run in ``out`` saved with its curve (its env, not the defaults), and its
    env kwargs as the engine takes them."""
    import json

    with open(os.path.join(out, "curve.json")) as f:
        saved = json.load(f)["config"]
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    env_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.env_kwargs.items()}
    return cfg, env_kwargs


def recheck(out: str, episodes: int, seed: int) -> None:
    """The run's checkpoints on reset seeds no evaluation of the run has seen: ``best.pt``
    was chosen on the run's own held-out seeds, so its score there is biased upwards."""
    cfg, env_kwargs = _saved_config(out)
    seeds = range(seed, seed + episodes)
    print(f"{episodes} fresh held-out seeds ({seed}...) of {cfg.env}: checkpoints of {out}")
    for name in ("warm_start", "best", "final"):
        policy, _ = load_checkpoint(os.path.join(out, f"{name}.pt"))
        with RolloutEngine(cfg.env, policy, num_envs=cfg.num_envs, env_kwargs=env_kwargs) as e:
            rates = evaluate(e, seeds)
        print(f"  {name + '.pt':<16} greedy {rates['greedy']:.3f}, sampled {rates['sampled']:.3f}")


def gradient_noise(out: str, checkpoint: str, batches: int) -> None:
    """How much of one GRPO batch's gradient is signal. ``batches`` independent batches of
    the run's size (``--groups`` informative groups of ``--group-size``, refilled as in
    training) from ``out/<checkpoint>.pt``; for each, the gradient of the GRPO loss over the
    whole batch at the weights that sampled it. With g_i = mu + noise_i, the mean of
    g_i . g_j over pairs i != j estimates |mu|^2 and the mean |g_i|^2 estimates |mu|^2 plus
    the noise's E|noise|^2: their ratio is the signal's share of a batch gradient's squared
    norm, and (1 - share) / share the batch multiple at which signal and noise are equal."""
    import itertools

    import torch

    from trainer.grpo import add_proximal_log_probs, dynamic_sample, grpo_loss

    cfg, env_kwargs = _saved_config(out)
    policy, _ = load_checkpoint(os.path.join(out, f"{checkpoint}.pt"))
    policy.eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    grads, infos = [], []
    kw = dict(num_envs=cfg.num_envs, num_workers=cfg.num_workers, env_kwargs=env_kwargs)
    with RolloutEngine(cfg.env, policy, seed=cfg.seed + 1, **kw) as engine:
        collect = lambda: engine.collect_episodes(cfg.groups, cfg.group_size)  # noqa: E731
        for _ in range(batches):
            batch, report = dynamic_sample(
                collect(), collect, cfg.groups, cfg.group_size, cfg.max_refills
            )
            if batch is None:
                continue
            add_proximal_log_probs(policy, batch)
            share = (1.0 / batch["length"].float()).sum()  # grpo_loss's per-episode weights
            policy.zero_grad(set_to_none=True)
            for lo in range(0, len(batch), 256):
                part = batch[lo : lo + 256]
                loss, _ = grpo_loss(policy, part, cfg.clip)
                (loss * (1.0 / part["length"].float()).sum() / share).backward()
            # Parameters the loss does not reach (the privileged head) count as zeros.
            flat = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            grads.append(torch.cat([g.reshape(-1) for g in flat]))
            infos.append((len(batch), report.groups_kept, report.successes / report.episodes))
    norms = [float(g.norm()) for g in grads]
    print(f"{checkpoint}.pt of {out} ({cfg.env}, {cfg.env_kwargs}):")
    for (rows, groups, success), norm in zip(infos, norms, strict=True):
        print(f"  batch: {rows} decisions, {groups} groups kept, success {success:.2f}, "
              f"|g| {norm:.4f}")  # fmt: skip
    if len(grads) < 2:
        print("  fewer than two informative batches: nothing to compare")
        return
    pairs = list(itertools.combinations(range(len(grads)), 2))
    dots = [float(grads[i] @ grads[j]) for i, j in pairs]
    cosines = [d / (norms[i] * norms[j]) for d, (i, j) in zip(dots, pairs, strict=True)]
    signal = statistics.mean(dots) / statistics.mean(x * x for x in norms)
    print(f"  cosine between batches: mean {statistics.mean(cosines):.3f} "
          f"(min {min(cosines):.3f}, max {max(cosines):.3f})")  # fmt: skip
    if signal > 0:
        print(f"  signal share of |g|^2: {signal:.3f}; signal equals noise at "
              f"{(1 - signal) / signal:.1f}x this batch")  # fmt: skip
    else:
        print(f"  signal share of |g|^2: {signal:.3f} (no signal measurable over the noise)")


def pixels_bc(episodes: int, steps: int) -> None:
    """Does a policy cloned from pixels generalise? ``episodes`` pick-place demonstrations
    with ``state="proprio"`` (one 64x64 camera), every tenth episode held out; TinyVLA cloned
    for ``steps`` steps twice on the same images, once with the proprioceptive state and once
    with the full state (the privileged one); per-token cross-entropy on both splits."""
    import torch
    import torch.nn.functional as F

    from pipeline import schema
    from pipeline.policies import TinyVLA
    from pipeline.policies.tinyvla import NUM_BINS, action_tokens
    from trainer.bc import behaviour_clone, collect_demos

    kw = {"cameras": ("head",), "image_size": 64, "state": "proprio"}
    demos, _ = collect_demos("tabletop/pick-place", kw, episodes, 8, num_envs=16)
    held_out = demos["row"] % 10 == 0
    print(f"{len(demos)} demonstration decisions, {int(held_out.sum())} held out")

    def cross_entropy(policy, d) -> float:
        with torch.no_grad():
            logits = policy.action_logits(d).reshape(-1, NUM_BINS)
        return float(F.cross_entropy(logits, action_tokens(d[schema.ACTION_CHUNK]).reshape(-1)))

    for name, state in (("proprio", schema.STATE), ("full", schema.PRIVILEGED)):
        d = demos.clone(recurse=False)
        d.set(schema.STATE, demos.get(state))
        torch.manual_seed(0)
        policy = TinyVLA(state_dim=d.get(schema.STATE).shape[-1], cameras=("head",), chunk_len=8)
        behaviour_clone(policy, d[~held_out], steps)
        train, test = cross_entropy(policy, d[~held_out]), cross_entropy(policy, d[held_out])
        print(f"  state {name:8s} per-token cross-entropy: train {train:.3f}, held out {test:.3f}")


def perception(scenes: int, steps: int, vision: str, lr: float, camera: str) -> None:
    """Can TinyVLA learn where things are? ``scenes`` reset scenes of ``tabletop/pick-place``
    with ``state="proprio"`` (one 64x64 ``camera``; the last 500 held out); TinyVLA with the
    given vision tower plus a small head on its pooled query features regress the object's
    and the target's table position from the image and the instruction (the object is one
    of two cubes, named by colour; the target is the only flat square) for ``steps`` steps
    of 32 at learning rate ``lr``; held-out mean absolute error in cm every 200 steps
    (predicting the mean scores about 7.5 and 8.5)."""
    import torch
    import torch.nn.functional as F

    from envs.tabletop.env import STATE_LAYOUT
    from pipeline import schema
    from pipeline.policies import TinyVLA
    from trainer.fitting import fit_minibatches
    from trainer.perception import reset_scenes

    kwargs = {"cameras": (camera,), "image_size": 64, "state": "proprio"}
    data = reset_scenes("tabletop/pick-place", kwargs, scenes, seed=10**7)
    privileged = data.get(schema.PRIVILEGED)
    xy = [STATE_LAYOUT["object_pos"].start, STATE_LAYOUT["target_pos"].start]
    truth = torch.cat([privileged[:, i : i + 2] for i in xy], dim=1)  # metres
    torch.manual_seed(0)
    policy = TinyVLA(state_dim=data.get(schema.STATE).shape[-1], cameras=(camera,), vision=vision)
    width = policy.cfg.dim
    head = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 4)
    )
    train_n = scenes - 500
    held = data[train_n:]

    def predict(td):  # decimetres: targets of order 1
        return head(policy.query_features(td).mean(1)) / 10

    def report(step: int) -> None:
        if step % 200 == 0:
            with torch.no_grad():
                err = (predict(held) - truth[train_n:]).abs().mean(0) * 100
            print(
                f"  step {step:5d} ({time.perf_counter() - t0:4.0f} s): held-out error "
                f"object {err[:2].mean():.2f} cm, target {err[2:].mean():.2f} cm",
                flush=True,
            )

    def batch_loss(idx, gen):
        loss = F.mse_loss(predict(data[idx]) * 10, truth[idx] * 10)
        return loss, loss

    print(f"{scenes} scenes, {vision} vision, lr {lr:g}, {camera} camera")
    t0 = time.perf_counter()
    params = [*policy.parameters(), *head.parameters()]
    fit_minibatches(policy, params, train_n, steps, batch_loss, 32, lr, 0, report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parts = ("demo", "async", "async-cpu", "recheck", "pixels-bc", "perception", "gradient-noise")
    ap.add_argument("--part", choices=parts, default="async")
    ap.add_argument(
        "--episodes", type=int, help="recheck: fresh seeds (256); pixels-bc: demonstrations (512)"
    )
    ap.add_argument("--seed", type=int, default=2 * 10**9, help="recheck: first fresh seed")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--bc-steps", type=int, default=1000, help="pixels-bc: cloning steps")
    ap.add_argument("--vision", default="film", help="perception: TinyVLA's vision tower")
    ap.add_argument("--lr", type=float, default=2e-4, help="perception: learning rate")
    ap.add_argument("--camera", default="top", help="perception: the camera")
    ap.add_argument("--scenes", type=int, default=8000, help="perception: reset scenes")
    ap.add_argument("--out", default="bench_results/grpo")
    ap.add_argument("--checkpoint", default="warm_start", help="gradient-noise: in --out")
    ap.add_argument("--batches", type=int, default=6, help="gradient-noise: batches")
    ap.add_argument(
        "--train-per-item-ms",
        type=float,
        action="append",
        help="async: simulated training cost per decision row (repeatable; default 0.5 and 3)",
    )
    args = ap.parse_args(argv)
    if args.part == "demo":
        demo(args.minutes, args.out)
    elif args.part == "recheck":
        recheck(args.out, args.episodes or 256, args.seed)
    elif args.part == "pixels-bc":
        pixels_bc(args.episodes or 512, args.bc_steps)
    elif args.part == "gradient-noise":
        gradient_noise(args.out, args.checkpoint, args.batches)
    elif args.part == "perception":
        perception(args.scenes, args.bc_steps, args.vision, args.lr, args.camera)
    elif args.part == "async":
        for per_item in args.train_per_item_ms or [0.5, 3.0]:
            async_simulated(args.iterations, per_item)
    else:
        async_cpu(args.iterations)
    return 0

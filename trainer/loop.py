"""The reference GRPO trainer: warm start, then GRPO iterations, synchronous or overlapped.

    python -m trainer --env tabletop/reach --minutes 25 --out runs/reach

Synchronous: collect a batch, train on it, repeat (the engine's policy *is* the trainer's).
Overlapped: while the trainer updates on batch k, the engine collects batch k+1 in the
background with the weights of version k (its own copy of the policy); ``update_weights``
hands over version k+1 for the batch after. The clipped ratio against the recorded
behaviour log-probs corrects for that one version of lag (decoupled PPO).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tensordict import TensorDict

import envs
from pipeline import RolloutEngine, schema
from pipeline.policies import TinyVLA
from pipeline.policies.layers import batched_kernels
from trainer.ablations import ablation_success
from trainer.bc import behaviour_clone, collect_demos
from trainer.checkpoints import load_checkpoint, load_resume, save_checkpoint, save_resume
from trainer.grpo import add_proximal_log_probs, dynamic_sample, evaluate, grpo_loss
from trainer.perception import PrivilegedHead, pretrain_perception, reset_scenes
from trainer.runlog import RunLog
from trainer.video import EvalVideo


@dataclass
class TrainConfig:
    """Everything a run depends on; saved with its curve and checkpoints."""

    env: str = "tabletop/reach"
    env_kwargs: dict = field(default_factory=lambda: {"cameras": ["head"], "image_size": 64})
    chunk_len: int = 8
    vision: str = "patches"  # TinyVLA's vision tower: "patches" (ViT), "keypoints" or "film"
    # Lookahead d (RolloutEngine(lookahead=d)): envs execute d actions of each chunk while
    # the next one is inferred, and the policy conditions on them (prefix conditioning,
    # cloned with random delays), so it trains under the delay it will face.
    lookahead: int = 0
    # Sampling temperature of rollouts: below 1 the policy GRPO trains is closer to the
    # greedy one it is evaluated as (the demo gained far more at 0.7 than at 1.0).
    temperature: float = 0.7
    num_envs: int = 16
    num_workers: int = 2
    num_stages: int = 2
    groups: int = 8  # informative groups per batch
    group_size: int = 8
    max_refills: int = 3
    iterations: int = 1000
    minutes: float | None = None  # stop after this much training wall time
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": from lr to lr/10 over the run's budget
    # Optimizer steps over which the step size rises linearly to the schedule's. Adam's first
    # steps move every weight by about lr whatever the gradient's size, so a fresh optimizer
    # on a cloned policy can undo the cloning in one update (KL 0.08 at 1e-4 on pixels).
    lr_warmup: int = 0
    # GRPO updates only the fusion, state projection and action head; the vision tower and
    # the instruction encoder (TinyVLA.perception_parameters) keep their warm-start weights.
    freeze_perception: bool = False
    clip: float = 0.2
    epochs: int = 1
    minibatch: int = 128
    async_rollouts: bool = False
    max_staleness: int = 1
    eval_every: int = 10
    eval_episodes: int = 128
    eval_seed: int = 10**9  # held-out reset seeds: eval_seed, eval_seed + 1, ...
    bc_demos: int = 128  # expert episodes for the warm start (0: none)
    bc_steps: int = 300
    bc_lr: float = 1e-3
    bc_state_noise: float = 0.0  # std of Gaussian noise on the state while cloning (bc.py)
    bc_privileged: float = 0.0  # weight of the privileged-state auxiliary loss (bc.py)
    # Perception pre-training before the cloning (trainer/perception.py): the vision tower
    # regresses the privileged state of this many fresh reset scenes (0: none) from image
    # and instruction, for perception_steps steps at bc_lr; cloning's privileged loss then
    # continues with the same head.
    perception_scenes: int = 0
    perception_steps: int = 2000
    warm_start: str | None = None  # a checkpoint to start from instead of cloning
    # Greedy held-out success with black images and with swapped instructions, at the warm
    # start and at the end (trainer/ablations.py); envs with cameras only.
    ablations: bool = True
    video: int = 0  # evaluation episodes per evaluation written as a GIF (trainer/video.py)
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package)
    checkpoint_every: int = 1  # iterations between resume checkpoints (out/resume.pt)
    resume: bool = False  # continue the run in out/ from its last resume checkpoint
    seed: int = 0
    out: str | None = None


# Reset seeds of perception pre-training: apart from the held-out evaluation seeds (10**9 on)
# and the training resets (hashed 63-bit seeds).
PERCEPTION_SEED = 10**7


def toy_reach_config(**overrides) -> TrainConfig:
    """A run small enough to learn in about a minute on 2 cores: ``toy`` with
    ``task="reach"`` (success depends on the actions), a weak warm start, 8 envs.

    40 iterations, because 20 were a coin toss: the sampled success of 48 held-out episodes
    moves by about 0.07 from noise alone, and after 20 iterations the gain was smaller than
    that on some CPUs (with async rollouts on an AMD EPYC: 0.625 -> 0.521). After 40 it was
    0.625 -> 0.79 (async rollouts), 0.625 -> 0.83 (synchronous, evaluated every 10) and
    0.27 -> 0.85 (lookahead 1), and 0.27 -> 0.71 with async rollouts and lookahead 1 together
    (0.67 after 25).

    Example:
        >>> curve = train(toy_reach_config(iterations=40))
    """
    base = TrainConfig(
        env="toy",
        env_kwargs={"task": "reach", "state_dim": 8, "episode_len": 20},
        chunk_len=4,
        num_envs=8,
        groups=4,
        group_size=8,
        iterations=40,
        eval_every=100,  # before and after only
        eval_episodes=48,
        bc_demos=32,
        bc_steps=40,
        lr=1e-3,
        lr_schedule="constant",
        temperature=1.0,
        epochs=2,
    )
    return dataclasses.replace(base, **overrides)


def grpo_update(
    policy: torch.nn.Module, opt, cfg: TrainConfig
) -> Callable[[TensorDict | None], dict]:
    """The trainer's half of an iteration: epochs of minibatch steps on the clipped loss."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def set_lr(progress: float) -> float:
        lr = learning_rate(cfg, progress, optimizer_steps(opt))
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

    def update(batch: TensorDict | None, progress: float) -> dict:
        lr = set_lr(progress)
        if batch is None:  # dynamic sampling found no informative group before its cap
            return {"lr": lr}
        # The proximal log-probs with the rollouts' own kernels, so that the behaviour weight
        # stays exactly 1 when synchronous (an input mismatch would show there); the steps
        # with torch's batched kernels, which take 0.5-0.6 of the time and start the ratio
        # within about 1e-4 of 1. The engine's rollouts never run inside that block (when
        # synchronous the engine is idle; overlapped, it has its own copy of the policy).
        add_proximal_log_probs(policy, batch)
        with batched_kernels(policy):
            policy.train()
            infos = []
            for _ in range(cfg.epochs):
                order = torch.randperm(len(batch), generator=gen)
                for lo in range(0, len(batch), cfg.minibatch):
                    part = batch[order[lo : lo + cfg.minibatch]]
                    loss, info = grpo_loss(policy, part, cfg.clip)
                    lr = set_lr(progress)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                    opt.step()
                    infos.append(dict(info, loss=float(loss.detach())))
        policy.eval()
        means = {k: sum(i[k] for i in infos) / len(infos) for k in infos[0]} if infos else {}
        return {**means, "lr": lr}

    update.generator = gen  # minibatch order: a resumed run restores its state
    return update


def learning_rate(cfg: TrainConfig, progress: float, step: int = 0) -> float:
    """The step size at ``progress`` (0 to 1) through the run's budget, for optimizer step
    ``step`` (0-based). A decaying step keeps the end of a run at its best rather than
    wherever the last noisy update left it; ``cfg.lr_warmup`` ramps the first steps.

    Example:
        >>> learning_rate(TrainConfig(lr=1e-4, lr_warmup=10), 0.0, step=4)  # 5/10 of 1e-4
        5e-05
    """
    if cfg.lr_schedule == "constant":
        lr = cfg.lr
    elif cfg.lr_schedule == "cosine":
        lr = cfg.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    else:
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if cfg.lr_warmup < 0:
        raise ValueError(f"lr_warmup must be >= 0 optimizer steps, got {cfg.lr_warmup}")
    if cfg.lr_warmup:
        lr *= min(1.0, (step + 1) / cfg.lr_warmup)
    return lr


def optimizer_steps(opt: torch.optim.Optimizer) -> int:
    """Steps ``opt`` has taken, from its own state (so a resumed optimizer knows them)."""
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def run_iterations(
    engine: RolloutEngine,
    policy: torch.nn.Module,
    update: Callable[[TensorDict | None, float], dict],
    cfg: TrainConfig,
    on_eval: Callable[[int], None] | None = None,
    on_record: Callable[[dict, dict], None] | None = None,
    prior: list[dict] | None = None,
) -> list[dict]:
    """GRPO iterations, synchronous or overlapped (``cfg.async_rollouts``); one record per
    iteration with its time split (rollout wait, train, weight sync) and sampling report.

    ``update(batch, progress)`` trains on a batch; ``progress`` is the fraction of the
    budget (iterations, or ``cfg.minutes``, whichever ends first) used so far.
    ``engine.policy`` must be ``policy`` itself when synchronous and a copy when
    overlapped. ``on_eval(i)`` runs when iteration ``i`` is due for evaluation, while the
    engine is idle and holds the weights of version ``i``; ``on_record(record, counters)``
    after each iteration, with the engine's counters as the next iteration's collection
    starts (what a resumed run restores). ``prior``: the records of the run this one resumes;
    iterations, env steps and wall time continue from them, and only the new records return.
    """
    records: list[dict] = []
    collect = lambda: engine.collect_episodes(cfg.groups, cfg.group_size)
    version = engine.policy_version
    start = time.perf_counter()
    prior = prior or []
    env_steps = prior[-1]["env_steps"] if prior else 0
    wall0 = prior[-1]["wall_s"] if prior else 0.0
    future = None
    if cfg.async_rollouts:
        future = engine.collect_episodes_async(cfg.groups, cfg.group_size)
    for it in range(len(prior), cfg.iterations):
        t0 = time.perf_counter()
        first = future.result() if future is not None else collect()
        t_wait = time.perf_counter() - t0
        eval_s = 0.0
        if on_eval is not None and it % cfg.eval_every == 0:
            e0 = time.perf_counter()
            on_eval(it)
            eval_s = time.perf_counter() - e0
        t1 = time.perf_counter()
        batch, report = dynamic_sample(first, collect, cfg.groups, cfg.group_size, cfg.max_refills)
        t_refill = time.perf_counter() - t1
        spent = wall0 + _training_wall(start, records, eval_s)
        last = it == cfg.iterations - 1 or (cfg.minutes is not None and spent >= cfg.minutes * 60)
        # Where the seeds stand before the next batch draws any (a resumed run starts here);
        # synchronously nothing draws between here and the iteration's end either.
        counters = engine.counters()
        if future is not None and not last:
            future = engine.collect_episodes_async(cfg.groups, cfg.group_size)
        progress = it / cfg.iterations
        if cfg.minutes is not None:
            progress = max(progress, spent / (cfg.minutes * 60))
        t2 = time.perf_counter()
        info = update(batch, progress)
        t_train = time.perf_counter() - t2
        t3 = time.perf_counter()
        version += 1
        if cfg.async_rollouts:
            engine.update_weights(policy, version)
        else:
            engine.set_policy_version(version)  # the engine's policy is the trainer's
        t_sync = time.perf_counter() - t3
        env_steps += report.env_steps
        episodes = max(1, report.episodes)
        records.append(
            {
                "iteration": it,
                "env_steps": env_steps,
                "env_steps_delta": report.env_steps,
                "wall_s": wall0 + _training_wall(start, records, eval_s),
                "iteration_s": time.perf_counter() - t0 - eval_s,
                "eval_s": eval_s,
                "rollout_s": t_wait + t_refill,
                "train_s": t_train,
                "sync_s": t_sync,
                "train_success": report.successes / episodes,
                "success_at_end": report.successes / episodes,
                "success_once": report.success_once / episodes,
                "episode_len": report.decisions / episodes,
                "calls": report.calls,
                "groups_kept": report.groups_kept,
                "dropped_all_success": report.dropped_all_success,
                "dropped_all_fail": report.dropped_all_fail,
                "capped": report.capped,
                "behaviour_versions": report.versions,
                "reset_seeds": report.reset_seeds,
                "version": version,
                **info,
            }
        )
        if on_record is not None:
            on_record(records[-1], counters)
        if last:
            break
    return records


def _training_wall(start: float, records: list[dict], eval_s: float) -> float:
    """Seconds since ``start`` less the time spent evaluating (not training time)."""
    return time.perf_counter() - start - sum(r["eval_s"] for r in records) - eval_s


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Warm start (or load), then GRPO; writes ``curve.json``, ``curve.png`` and
    checkpoints into ``cfg.out`` when given (``warm_start.pt``, ``final.pt``, and
    ``best.pt``: the best greedy held-out success so far). Returns the curve.

    Example:
        >>> curve = train(TrainConfig(env="toy", env_kwargs={"task": "reach"}, iterations=20))
        >>> curve["evals"][-1]["success"] > curve["evals"][0]["success"]
    """
    torch.manual_seed(cfg.seed)
    env_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.env_kwargs.items()}
    spec = envs.make(cfg.env, **env_kwargs).spec
    saved = load_resume(cfg) if cfg.resume else None
    if saved is not None:
        policy, curve = saved["policy"], saved["curve"]
        log(f"resuming {cfg.out} at iteration {len(curve['iterations'])}")
    else:
        curve = {"config": asdict(cfg), "warm_start": {}, "iterations": [], "evals": []}
        policy = _warm_start(cfg, spec, env_kwargs, curve, log)
    policy.eval()
    if cfg.freeze_perception:
        for p in policy.perception_parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    update = grpo_update(policy, opt, cfg)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])
        update.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
    rollout_policy = copy.deepcopy(policy) if cfg.async_rollouts else policy
    eval_seeds = list(range(cfg.eval_seed, cfg.eval_seed + cfg.eval_episodes))
    engine_kw = dict(
        num_envs=cfg.num_envs,
        num_workers=cfg.num_workers,
        num_stages=cfg.num_stages,
        env_kwargs=env_kwargs,
        seed=cfg.seed,
        lookahead=cfg.lookahead,
    )
    ablate = cfg.ablations and bool(spec.cameras)
    eval_engine = lambda p: RolloutEngine(cfg.env, p, **engine_kw)  # noqa: E731
    if ablate and saved is None:
        curve["ablations"] = {"warm_start": ablation_success(eval_engine, policy, eval_seeds)}
        log(f"ablations at the warm start: {curve['ablations']['warm_start']}")
    prior = curve["iterations"]
    runlog = RunLog(cfg.out, cfg.iterations, cfg.minutes, log, cfg.wandb, start_step=len(prior))
    video = None
    if cfg.video and cfg.out and spec.cameras:
        video = EvalVideo(os.path.join(cfg.out, "videos"), cfg.video, spec.cameras[0])
        if saved is not None and saved.get("video") is not None:
            video.load_state(saved["video"])
    with RolloutEngine(
        cfg.env,
        rollout_policy,
        max_staleness=cfg.max_staleness if cfg.async_rollouts else None,
        **engine_kw,
    ) as engine:
        if saved is not None:
            engine.restore_counters(saved["counters"])
            engine.set_policy_version(saved["version"])

        def on_eval(it: int) -> None:
            rates = evaluate(engine, eval_seeds)
            best = max((e["success"] for e in curve["evals"]), default=-1.0)
            curve["evals"].append({"iteration": it, "success": rates["greedy"], **rates})
            runlog.evaluation(curve["evals"][-1])
            if video is not None:
                video.record(engine, it, eval_seeds)
            if cfg.out and rates["greedy"] > best:  # the weights the engine just evaluated
                save_checkpoint(os.path.join(cfg.out, "best.pt"), engine.policy, rates)
            log(
                f"eval @ iteration {it}: held-out success greedy {rates['greedy']:.2f}, "
                f"sampled {rates['sampled']:.2f}"
            )

        new: list[dict] = []

        def on_record(rec: dict, counters: dict) -> None:
            new.append(rec)
            runlog.iteration(rec)
            if cfg.out and (len(prior) + len(new)) % cfg.checkpoint_every == 0:
                save_resume(cfg, policy, opt, update.generator, counters, rec["version"],
                            dict(curve, iterations=prior + new), video)  # fmt: skip

        run_iterations(engine, policy, update, cfg, on_eval, on_record, prior=prior)
        on_eval(len(prior) + len(new))
        curve["stale_dropped"] = engine.stats.stale_dropped
    runlog.close()
    curve["iterations"] = prior + new
    attach_progress(curve)
    if ablate:
        curve["ablations"]["final"] = ablation_success(eval_engine, policy, eval_seeds)
        log(f"ablations at the end: {curve['ablations']['final']}")
    log(f"after {len(curve['iterations'])} iterations")
    if cfg.out:
        meta = {"iterations": len(curve["iterations"])}
        save_checkpoint(os.path.join(cfg.out, "final.pt"), policy, meta)
        write_curve(curve, cfg.out)
    return curve


def _warm_start(cfg: TrainConfig, spec, env_kwargs: dict, curve: dict, log) -> TinyVLA:
    """The policy GRPO starts from: a checkpoint, or cloned from expert demonstrations."""
    t0 = time.perf_counter()
    if cfg.warm_start:
        policy, meta = load_checkpoint(cfg.warm_start)
        curve["warm_start"] = {"from": cfg.warm_start, **meta}
        return policy
    policy = TinyVLA.from_spec(
        spec,
        chunk_len=cfg.chunk_len,
        temperature=cfg.temperature,
        prefix_conditioning=cfg.lookahead > 0,
        vision=cfg.vision,
    )
    demos = None
    if cfg.bc_demos:
        demos, expert_rate = collect_demos(
            cfg.env, env_kwargs, cfg.bc_demos, cfg.chunk_len, seed=cfg.seed + 12345
        )
    head = None
    if cfg.perception_scenes:
        seed = PERCEPTION_SEED + cfg.seed * 10**6
        scenes = reset_scenes(cfg.env, env_kwargs, cfg.perception_scenes + 256, seed)
        # One standardisation over the reset scenes and the demonstrations: the head goes on
        # into the cloning, whose states (a lifted, turned cube; a moved arm) a reset never
        # shows, and a dimension nearly constant at reset would blow up there.
        reference = [scenes.get(schema.PRIVILEGED)]
        if demos is not None and cfg.bc_privileged:
            reference.append(demos.get(schema.PRIVILEGED))
        head = PrivilegedHead(policy.cfg.dim, torch.cat([r.float() for r in reference]))
        plosses = pretrain_perception(
            policy,
            head,
            scenes[256:],
            cfg.perception_steps,
            lr=cfg.bc_lr,
            seed=cfg.seed,
            held_out=scenes[:256],
            log=log,
        )
        curve["perception"] = {
            "scenes": cfg.perception_scenes,
            "steps": cfg.perception_steps,
            "loss_first_last": [plosses[0], plosses[-1]] if plosses else [],
            "seconds": time.perf_counter() - t0,
        }
    if demos is not None:
        losses = behaviour_clone(
            policy,
            demos,
            cfg.bc_steps,
            lr=cfg.bc_lr,
            seed=cfg.seed,
            max_delay=cfg.lookahead,
            state_noise=cfg.bc_state_noise,
            privileged_weight=cfg.bc_privileged,
            privileged_head=head,
        )
        curve["warm_start"] = {
            "demos": cfg.bc_demos,
            "demo_steps": len(demos),
            "expert_success": expert_rate,
            "bc_steps": cfg.bc_steps,
            "bc_loss_first_last": [losses[0], losses[-1]],
            "seconds": time.perf_counter() - t0,
        }
        log(
            f"warm start: {len(demos)} demo decisions, BC loss {losses[0]:.2f} -> "
            f"{losses[-1]:.2f} in {time.perf_counter() - t0:.0f} s"
        )
        if cfg.out:
            save_checkpoint(os.path.join(cfg.out, "warm_start.pt"), policy, curve["warm_start"])
    return policy


def attach_progress(curve: dict) -> None:
    """Give each eval the env steps and training wall time reached when it ran (an eval at
    iteration i ran before that iteration's rollout was counted)."""
    its = curve["iterations"]
    for ev in curve["evals"]:
        done = its[: ev["iteration"]]
        ev["env_steps"] = done[-1]["env_steps"] if done else 0
        ev["wall_s"] = done[-1]["wall_s"] if done else 0.0


def write_curve(curve: dict, out: str) -> None:
    """``curve.json`` and ``curve.png``: held-out success against env steps and wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    evals, its = curve["evals"], curve["iterations"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "env_steps", "env steps"), (axes[1], "wall_s", "wall s")):
        for metric, style in (("greedy", "o-"), ("sampled", "s--")):
            ax.plot(
                [e[key] for e in evals],
                [e[metric] for e in evals],
                style,
                label=f"held-out, {metric}",
            )
        ax.plot(
            [r[key] for r in its],
            [r["train_success"] for r in its],
            alpha=0.4,
            label="training batches",
        )
        ax.set_xlabel(label)
        ax.set_ylabel("success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    cfg = curve["config"]
    mode = "async" if cfg.get("async_rollouts") else "synchronous"
    fig.suptitle(curve.get("title", f"GRPO on {cfg['env']} ({mode})"))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=100)
    plt.close(fig)

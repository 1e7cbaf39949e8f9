"""The same workload through Gymnasium's ``AsyncVectorEnv(shared_memory=True)``, lock-step.

This is what a user would otherwise write: one process per env (Gymnasium's only layout, so
``num_envs`` processes where the engine uses ``num_workers``), observations through its
shared memory, the same policy, one batched forward pass per decision.

For an env of another suite (``gym:``, ``robosuite/``, ``maniskill/``) the vector env is
driven the way a user drives it: **action by action**, ``chunk`` vector steps per decision,
each step observing whatever the env observes per step (robosuite renders its cameras on
every step; an ``rgb_array`` env renders on every step). For this project's own envs the
vector env's action is a whole chunk (its ``step_chunk``), as before.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from pipeline import schema


class ChunkedGymEnv:
    """A Gymnasium env whose action is a whole chunk (it runs ``step_chunk``)."""

    def __new__(cls, env_name: str, env_kwargs: dict, chunk: int, lean: bool = False):
        import gymnasium
        from gymnasium import spaces

        import envs

        class _Env(gymnasium.Env):
            def __init__(self):
                self.env = envs.make(env_name, **env_kwargs)
                spec = self.env.spec
                obs = {}
                for key, fs in spec.obs.items():
                    low, high = (0, 255) if fs.dtype == np.uint8 else (-np.inf, np.inf)
                    obs[key] = spaces.Box(low, high, fs.shape, fs.dtype)
                self.observation_space = spaces.Dict(obs)
                self.action_space = spaces.Box(-1.0, 1.0, (chunk, spec.action_dim), np.float32)

            def reset(self, *, seed=None, options=None):
                obs, _ = self.env.reset(seed=seed)
                return obs, {"instruction": self.env.instruction}

            def step(self, action):
                res = self.env.step_chunk(action)
                if lean:  # no per-step info: Gymnasium merges infos in Python every step
                    return res.obs, float(res.rewards.sum()), res.terminated, res.truncated, {}
                info = {"steps": res.steps, "instruction": self.env.instruction}
                return res.obs, float(res.rewards.sum()), res.terminated, res.truncated, info

        return _Env()


SUITES = ("gym:", "robosuite/", "maniskill/")


class StepwiseGymEnv:
    """A suite's env, one action a step, observing every step as the env itself does."""

    def __new__(cls, env_name: str, env_kwargs: dict):
        import gymnasium
        from gymnasium import spaces

        import envs

        class _Env(gymnasium.Env):
            def __init__(self):
                self.env = envs.make(env_name, **env_kwargs)
                spec = self.env.spec
                obs = {}
                for key, fs in spec.obs.items():
                    low, high = (0, 255) if fs.dtype == np.uint8 else (-np.inf, np.inf)
                    obs[key] = spaces.Box(low, high, fs.shape, fs.dtype)
                self.observation_space = spaces.Dict(obs)
                self.action_space = self.env.env.action_space

            def reset(self, *, seed=None, options=None):
                obs, _ = self.env.reset(seed=seed)
                return obs, {"instruction": self.env.instruction}

            def step(self, action):
                # One action, observed in full: for robosuite, its cameras render this step,
                # as they do on every step of a plain robosuite loop.
                res = self.env.step_chunk(np.asarray(action)[None])
                return res.obs, float(res.rewards.sum()), res.terminated, res.truncated, {}

        return _Env()


_TEXTS: dict[tuple, NonTensorStack] = {}


def _batch(obs: dict, instructions, seeds: np.ndarray, device) -> TensorDict:
    td = TensorDict({}, batch_size=[len(seeds)])
    for key, value in obs.items():
        x = torch.from_numpy(np.asarray(value))
        if key.startswith("image/"):
            td.set(schema.image_key(key.split("/", 1)[1]), x.permute(0, 3, 1, 2))
        else:
            td.set((schema.OBSERVATION, key), x)
    # Instructions change only with episodes: built once per set, as the engine does.
    texts = tuple(str(s) for s in instructions)
    stack = _TEXTS.get(texts)
    if stack is None:
        stack = _TEXTS[texts] = NonTensorStack(*[NonTensorData(t) for t in texts])
    td.set(schema.INSTRUCTION, stack)
    td.set(schema.SAMPLE_SEED, torch.from_numpy(seeds))
    return td if device.type == "cpu" else td.to(device)


def run_gymnasium(
    args, spec, policy, device, quiet: bool = False, lean: bool = False, raw: bool = False
) -> dict:
    """``lean``: the env returns no per-step info, and env steps are counted as
    ``chunk`` per env and decision (exact for an env whose episodes never end early).
    ``raw``: no policy and no TensorDict either; the same zero actions every step, the
    rawest stepping Gymnasium can do (``policy`` is unused)."""
    from gymnasium.vector import AsyncVectorEnv

    from benchmarks.main import env_kwargs

    kwargs = env_kwargs(args)
    n = args.num_envs
    stepwise = args.env.startswith(SUITES)
    label = "gymnasium AsyncVectorEnv" + (", action by action" if stepwise else "")
    label += ", raw (no policy)" if raw else ""
    say = (lambda *a, **k: None) if quiet else print
    say(f"  {label}: starting {n} processes (one per env)", flush=True)
    if stepwise:
        make = lambda: StepwiseGymEnv(args.env, kwargs)
    else:
        make = lambda: ChunkedGymEnv(args.env, kwargs, args.chunk, lean)
    vec = AsyncVectorEnv([make for _ in range(n)], shared_memory=True, context="spawn")
    try:
        obs, info = vec.reset(seed=list(range(n)))
        instructions = info["instruction"]
        decision = 0
        zeros = np.zeros(vec.action_space.shape, vec.action_space.dtype)

        def step(k: int) -> int:
            nonlocal obs, instructions, decision
            steps = 0
            for _ in range(k):
                if raw:
                    actions = zeros
                else:
                    seeds = np.arange(n, dtype=np.int64) + decision * n
                    out = policy(_batch(obs, instructions, seeds, device))
                    actions = out[schema.ACTION_CHUNK].detach().cpu().numpy()
                    actions = actions[:, : args.exec or args.chunk]
                if stepwise:
                    for j in range(actions.shape[1]):
                        obs, _, _, _, info = vec.step(actions[:, j])
                    steps += n * actions.shape[1]
                    decision += 1
                    continue
                obs, _, _, _, info = vec.step(actions)
                instructions = info.get("instruction", instructions)
                steps += n * args.chunk if lean else int(np.sum(info.get("steps", 0)))
                decision += 1
            return steps

        step(max(2, args.decisions // 2))
        windows = []
        for w in range(args.windows):
            t0 = time.perf_counter()
            steps = step(args.decisions)
            wall = time.perf_counter() - t0
            windows.append(
                {
                    "wall_s": wall,
                    "decisions_per_s": n * args.decisions / wall,
                    "env_steps_per_s": steps / wall,
                }
            )
            say(
                f"  {label}: window {w + 1}/{args.windows}: "
                f"{windows[-1]['decisions_per_s']:.1f} decisions/s",
                flush=True,
            )
    finally:
        vec.close()
    res = {"label": label, "mode": "gymnasium", "windows": windows}
    for key in ("decisions_per_s", "env_steps_per_s"):
        vals = [x[key] for x in windows]
        res[key] = statistics.median(vals)
        res[key + "_spread"] = [min(vals), max(vals)]
    return res

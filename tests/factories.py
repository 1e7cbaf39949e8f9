"""Env factories for the tests: each builds a toy env with a fault.

Workers unpickle a factory by importing its module, so this one imports nothing heavy (no
torch, no pytest): a worker that starts with one is as quick to start as with a registered
name (importing torch in every spawned worker cost ~3 s a start).
"""

import os

import numpy as np

from pipeline.runtime.worker import current_worker


def failing_env(**kw):
    """A toy env (``envs.make("toy", **kw)``) whose control steps raise after the fifth."""
    import envs

    env = envs.make("toy", **kw)
    apply, count = env._apply, [0]

    def bad(action):
        count[0] += 1
        if count[0] > 5:
            raise ValueError("the gripper fell off")
        return apply(action)

    env._apply = bad
    return env


def stuck_env(**kw):
    """A toy env whose first chunk never ends (for the watchdog)."""
    import time

    import envs

    env = envs.make("toy", **kw)

    def stuck(actions):
        time.sleep(3600)

    env.step_chunk = stuck
    return env


def crashing_env(marker_dir, how, crashes=1, at_chunk=3, base="toy", **kw):
    """An env (``envs.make(base, **kw)``, toy by default) that fails ``crashes`` times
    machine-wide (counted by marker files): worker 1's first env, at its ``at_chunk``-th
    chunk. ``how``: "kill" (SIGKILL itself), "segfault", "raise" (an exception in
    step_chunk)."""
    import signal as sig

    import envs as E

    env = E.make(base, **kw)
    step_chunk, chunks = env.step_chunk, [0]

    def flaky(actions):
        chunks[0] += 1
        here = env.first and current_worker() == 1
        done = len(os.listdir(marker_dir))
        if chunks[0] == at_chunk and here and done < crashes:
            open(os.path.join(marker_dir, f"crashed-{done}"), "w").close()
            if how == "kill":  # what the OOM killer does
                os.kill(os.getpid(), sig.SIGKILL)
            if how == "segfault":  # a real one: a read of address 0
                import ctypes

                ctypes.string_at(0)
            raise RuntimeError("the simulator lost its contact cache")
        return step_chunk(actions)

    env.step_chunk = flaky
    return env


def flaky_env(marker_dir, how, crashes=1, **kw):
    """:func:`crashing_env` as the factory of every env of an engine: the first env each
    worker makes is the one that fails (worker 1's is env 1)."""
    env = crashing_env(marker_dir, how, crashes, **kw)
    made = flaky_env.__dict__.setdefault("made", set())  # per process: the workers seen
    key = (marker_dir, current_worker())  # the inline backend runs every engine here
    env.first = key not in made
    made.add(key)
    return env


def bad_obs_env(kind, bad_env=1, **kw):
    """A toy env that turns bad on its second chunk, in env ``bad_env`` only."""
    import envs as E

    env = E.make("toy", **kw)
    observe = env._observe
    calls = [0]
    worker = current_worker()

    def bad():
        obs = observe()
        calls[0] += 1
        if calls[0] < 3 or worker != bad_env % 2:
            return obs
        if kind == "shape":
            obs["state"] = obs["state"][:-1]
        elif kind == "dtype":
            obs["image/cam"] = obs["image/cam"].astype(np.float32)
        elif kind == "nan":
            obs["state"] = obs["state"].copy()
            obs["state"][2] = np.nan
        elif kind == "missing":
            del obs["image/cam"]
        return obs

    env._observe = bad
    return env


def fails_in_worker_1(marker_dir, **kw):
    import envs as E

    if current_worker() == 1:
        raise RuntimeError("no robot on worker 1")
    env = E.make("toy", **kw)
    close = env.close

    def closing():
        with open(os.path.join(marker_dir, f"closed-{os.getpid()}"), "w"):
            pass
        close()

    env.close = closing
    return env


def fails_once_at_start(marker_dir, **kw):
    """Fails at creation in worker 1 the first time only (a transient start-up error)."""
    import envs as E

    marker = os.path.join(marker_dir, "failed")
    if current_worker() == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        raise OSError("license server unreachable")
    return E.make("toy", **kw)


def always_fails(**kw):
    raise OSError("no such robot")


def always_crashes(**kw):
    import envs as E

    env = E.make("toy", **kw)

    def crash(actions):
        raise RuntimeError("diverged")

    env.step_chunk = crash
    return env


def sleeps_forever(**kw):
    import time

    import envs as E

    env = E.make("toy", **kw)

    def stuck(actions):
        time.sleep(3600)  # the line the watchdog must point at

    env.step_chunk = stuck
    return env


def slow_steps(step_sleep_s, **kw):
    import time

    import envs as E

    env = E.make("toy", **kw)
    apply = env._apply

    def slow(action):
        time.sleep(step_sleep_s)
        return apply(action)

    env._apply = slow
    return env


def gym_raising_env(after=5, **kw):
    """Gymnasium's ``Pusher-v5`` through the adapter, its own ``step`` raising after
    ``after`` steps (an error inside the wrapped env, not the adapter)."""
    import gymnasium

    from envs.gym import from_gym

    class Breaks(gymnasium.Wrapper):
        steps = 0

        def step(self, action):
            self.steps += 1
            if self.steps > after:
                raise FloatingPointError("mj_step: simulation unstable")
            return self.env.step(action)

    return from_gym(lambda: Breaks(gymnasium.make("Pusher-v5")), **kw)

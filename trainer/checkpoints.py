"""Checkpoints: a policy's weights with what rebuilds it, and the whole state a killed run
resumes from.

A resume checkpoint (``out/resume.pt``) holds the weights, the optimizer's state, the
minibatch generator's and torch's RNG states, the engine's counters as the next iteration's
collection starts (so the resumed run draws exactly the seeds the uninterrupted one would
have drawn next, and never an evaluation seed: those come from their own range), the policy
version, the curve so far and the video's warm-start frames. It is written to a temporary
file and renamed over the last one, so a kill at any point leaves a whole checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from pipeline.policies import TinyVLA

RESUME_FILE = "resume.pt"
# Options a resumed run may change; any other difference from the saved config is an error.
MAY_CHANGE = ("resume", "iterations", "minutes", "video", "wandb", "checkpoint_every")


def _arch(policy: TinyVLA) -> dict:
    return {
        "state_dim": policy.state_dim,
        "action_dim": policy.action_dim,
        "cameras": list(policy.cameras),
        "chunk_len": policy.chunk_len,
        "head": policy.head,
        "size": policy.size,
        "temperature": policy.temperature,
        "prefix_conditioning": policy.conditions_on_prefix,
        "vision": policy.vision_kind,
    }


def _build(arch: dict, state_dict: dict) -> TinyVLA:
    policy = TinyVLA(**dict(arch, cameras=tuple(arch["cameras"])))
    policy.load_state_dict(state_dict)
    return policy.eval()


def save_checkpoint(path: str, policy: TinyVLA, meta: dict) -> None:
    """Weights plus what rebuilds the policy (:func:`load_checkpoint`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"arch": _arch(policy), "state_dict": policy.state_dict(), "meta": meta}, path)


def load_checkpoint(path: str) -> tuple[TinyVLA, dict]:
    """Example:
    >>> policy, meta = load_checkpoint("runs/reach/warm_start.pt")
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return _build(ckpt["arch"], ckpt["state_dict"]), ckpt["meta"]


def save_resume(cfg, policy, opt, generator, counters, version, curve, video) -> None:
    """Write ``cfg.out/resume.pt`` (atomically: a kill mid-write keeps the previous one)."""
    path = os.path.join(cfg.out, RESUME_FILE)
    os.makedirs(cfg.out, exist_ok=True)
    state = {
        "arch": _arch(policy),
        "state_dict": policy.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "counters": counters,
        "version": int(version),
        "curve": json.loads(json.dumps(curve)),
        "video": video.state() if video is not None else None,
    }
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_resume(cfg) -> dict:
    """What :func:`save_resume` wrote for the run in ``cfg.out``, with the policy rebuilt.

    Raises:
        FileNotFoundError: the run has no resume checkpoint.
        ValueError: the config differs from the saved one in an option a resumed run cannot
            change (named).
    """
    if not cfg.out:
        raise ValueError("resume needs the run's directory: pass out")
    path = os.path.join(cfg.out, RESUME_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no resume checkpoint at {path}: nothing to resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["curve"]["config"]
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = sorted(k for k in now if k not in MAY_CHANGE and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"resume: the run in {cfg.out} was started with other options ({diffs})")
    state["curve"]["config"] = now
    state["policy"] = _build(state["arch"], state["state_dict"])
    return state

"""Engine outputs as a trainer indexes them.

``rollout()`` returns ``[N, T]`` and ``collect_episodes()`` returns ``[E]`` with ``[E, T, ...]``
trajectory fields; a loss wants one row per decision that was made. :func:`steps` gives
exactly that, per-episode fields included, with no hand-built TensorDicts.
"""

from __future__ import annotations

import torch
from tensordict import NonTensorData, TensorDict, TensorDictBase

from pipeline import schema


def steps(td: TensorDictBase) -> TensorDict:
    """One row per recorded decision (``mask`` True), in episode-major order.

    Works on both outputs. From ``collect_episodes`` the per-episode fields (``success``,
    ``length``, ``env_steps``, ``group_id``, ``restarts``) are repeated on each of the
    episode's steps. ``row`` says which row of ``td`` a step came from (the episode, or the
    env for ``rollout``), so per-episode values such as advantages are gathered with it. The
    canonical VLA keys keep their names and layouts (images ``[M, C, H, W]``, chunks
    ``[M, H, A]``).

    Example:
        >>> eps = engine.collect_episodes(num_groups=4, group_size=8)
        >>> batch = steps(eps)                      # TensorDict [eps["length"].sum()]
        >>> new_logp = policy.log_prob(batch, batch["vla_action", "tokens"])
        >>> ratio = (new_logp - batch["sample_log_prob"]).exp()
    """
    if "mask" not in td.keys():
        raise KeyError("steps() needs an engine output with a 'mask' entry")
    mask = td.get("mask")
    if mask.dim() != 2:
        raise ValueError(f"'mask' must be [rows, T], got {list(mask.shape)}")
    rows, horizon = mask.shape
    grid = TensorDict({}, batch_size=[rows, horizon])
    for key in td.keys(include_nested=True, leaves_only=True):
        value = td.get(key)
        if key == schema.INSTRUCTION:
            continue
        if value.shape[:2] == (rows, horizon):
            grid.set(key, value)
        elif value.dim() >= 1 and value.shape[0] == rows:  # a per-episode field
            rest = value.shape[1:]
            grid.set(key, value.reshape(rows, 1, *rest).expand(rows, horizon, *rest))
    grid.set("row", torch.arange(rows).unsqueeze(1).expand(rows, horizon))
    flat = mask.reshape(-1)
    out = grid.reshape(-1)[flat]
    texts = td.get(schema.INSTRUCTION, None)
    if texts is not None:
        per_row = texts.tolist()  # [rows][T] strings
        picked = [per_row[i][t] for i, t in mask.nonzero().tolist()]
        items = {text: NonTensorData(text) for text in set(picked)}  # ~20 us each: once a text
        out.set(schema.INSTRUCTION, schema.text_stack([items[text] for text in picked]))
    return out

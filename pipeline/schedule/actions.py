"""The action path: from the policy's output to the action chunks the workers read.

Every check runs before the chunks are released: a STEP frame goes out only after
:meth:`ActionPath.take` returns, so a bad output never reaches the physics.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import schema
from pipeline.errors import PolicyOutputError
from pipeline.schedule.lookahead import Lookahead, prefix_fields
from pipeline.schedule.stages import Stage


def host(t: torch.Tensor) -> np.ndarray:
    """A policy output as a host array; half-precision floats widen to float32 (numpy has no
    bfloat16)."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


class ActionPath:
    """Validates a policy output and lands its action chunks in shared memory.

    Example:
        >>> outputs = actions.take([stage], policy(batch))   # raises PolicyOutputError
        >>> outputs[schema.ACTION_CHUNK].shape                # host rows, for the record
        (8, 25, 7)
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        action_dim: int,
        lookahead: Lookahead,
        conditions_on_prefix: bool,
        cuda=None,
    ) -> None:
        self.a, self.action_dim, self.lookahead = arrays, action_dim, lookahead
        self.chunk_len = lookahead.chunk_len
        self.conditions, self.cuda = conditions_on_prefix, cuda
        self.slots = torch.from_numpy(arrays["actions"])  # [num_envs, H, A] float32
        self.staging: torch.Tensor | None = None  # dynamic batches' chunks, pinned, on CUDA

    def take(self, stages: list[Stage], out) -> dict[object, np.ndarray]:
        """Validate ``out`` for ``stages`` and copy its chunks into their envs' rows.

        Returns host arrays to record (rows in the order of ``stages``).

        Raises:
            PolicyOutputError: not a TensorDict, a chunk of the wrong shape or dtype, NaN or
                inf actions, or malformed tokens or log-probabilities; nothing was sent.
        """
        batch = sum(s.size for s in stages)
        if not hasattr(out, "get"):
            raise PolicyOutputError(f"policy returned {type(out).__name__}, not a TensorDict")
        chunk = out.get(schema.ACTION_CHUNK, None)
        want = (batch, self.chunk_len, self.action_dim)
        if not isinstance(chunk, torch.Tensor):
            raise PolicyOutputError(f"policy output has no tensor at {schema.ACTION_CHUNK}")
        if tuple(chunk.shape) != want:
            raise PolicyOutputError(f"action chunk has shape {tuple(chunk.shape)}, expected {want}")
        if not chunk.dtype.is_floating_point:
            raise PolicyOutputError(f"action chunk has dtype {chunk.dtype}, expected a float dtype")
        rows = self._land(stages, chunk, batch)
        actions = self.a["actions"][rows]
        if not np.isfinite(actions).all():
            raise PolicyOutputError(
                "action chunk contains NaN or inf; nothing was sent to the envs"
            )
        outputs = {schema.ACTION_CHUNK: actions}
        if self.lookahead.enabled:
            outputs.update(self._frozen_prefix(stages, rows, actions))
        tokens = out.get(schema.ACTION_TOKENS, None)
        if tokens is not None:
            if tuple(tokens.shape) != want or tokens.dtype != torch.long:
                got = f"{tokens.dtype}{list(tokens.shape)}"
                raise PolicyOutputError(f"action tokens are {got}, expected int64{list(want)}")
            outputs[schema.ACTION_TOKENS] = host(tokens)
        logp = out.get(schema.SAMPLE_LOG_PROB, None)
        if logp is not None:
            logp = host(logp)
            if logp.shape != (batch,) or not np.isfinite(logp).all():
                raise PolicyOutputError(
                    f"sample_log_prob must be finite [{batch}], got {logp.shape}"
                )
            outputs[schema.SAMPLE_LOG_PROB] = logp
        return outputs

    def _land(self, stages: list[Stage], chunk: torch.Tensor, batch: int):
        """Copy the chunk into the envs' action rows; returns the rows (a slice or indices).

        torch's copy converts any float dtype (bfloat16 included) into the float32 slots."""
        cuda = self.cuda if chunk.is_cuda else None
        if len(stages) == 1:
            rows = slice(stages[0].lo, stages[0].hi)
        else:  # a dynamic batch: rows from anywhere, one scatter
            rows = np.fromiter((s.lo for s in stages), np.int64, len(stages))
        if cuda is None and chunk.dtype == torch.float32:
            # The same values by numpy's copy: cold, as after every policy wait, a third of
            # torch's conversion and copy (dynamic batches: 192 against 326 us for the take).
            self.a["actions"][rows] = chunk.detach().numpy()
            return rows
        if len(stages) == 1:
            if cuda is not None:
                cuda.to_host(self.slots[rows], chunk)
            else:
                self.slots[rows].copy_(chunk.detach())
            return rows
        if cuda is not None:
            if self.staging is None:
                self.staging = torch.empty_like(self.slots, pin_memory=True)
            staged = self.staging[:batch]
            cuda.to_host(staged, chunk)
        else:
            staged = chunk.detach().to(torch.float32)
        self.slots.index_copy_(0, torch.from_numpy(rows), staged)
        return rows

    def _frozen_prefix(self, stages: list[Stage], rows, actions: np.ndarray) -> dict:
        """With lookahead: the decision's frozen prefix goes into its chunk (the env executes
        those actions whatever the policy said, so the record says what ran), and the
        conditioning is recorded with it."""
        slots = stages[0].slot if len(stages) == 1 else np.array([s.slot for s in stages])
        f = prefix_fields(self.a, slots, rows, self.lookahead.overlap)
        n = f["prefix_len"]
        frozen = np.arange(self.chunk_len) < n[:, None]
        if frozen.any():  # the workers never read these positions: this is for the record
            actions[frozen] = f["prefix"][frozen]
        return {
            schema.ACTION_PREFIX: f["prefix"],
            schema.PREFIX_LEN: n,
            schema.PREFIX_OVERLAP: f["prefix_overlap"],
            schema.PREFIX_CONDITIONED: (n > 0) & self.conditions,
        }

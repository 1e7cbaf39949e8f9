"""Where a training run's figures go: TensorBoard event files, Weights & Biases when it is
installed and asked for, and one status line per iteration.

Success is logged two ways, because VLA-RL systems mean different things by it:
``success_once`` is the share of episodes that succeeded at any step, ``success_at_end`` the
share whose last step was a success (the engine's ``success``). Envs that end an episode at
its first success (every tabletop task) make them equal; an env that keeps running after a
success can fail again, and then only ``success_at_end`` counts it as failed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

Log = Callable[[str], None]


class RunLog:
    """One run's logs under ``out``: ``tb/`` (TensorBoard), and a status line per iteration.

    Example:
        >>> runlog = RunLog("runs/reach", iterations=200, minutes=None)
        >>> runlog.iteration({"iteration": 0, "env_steps": 3100, "wall_s": 5.2, ...})
        it 1/200 | success 0.41 (once 0.41) | 596 env steps/s | ETA 17m13s
        >>> runlog.evaluation({"iteration": 10, "greedy": 0.6, "sampled": 0.55, ...})
        >>> runlog.close()

    Args:
        out: the run's directory; None: status lines only.
        iterations: the run's iteration budget, for the ETA.
        minutes: its wall-time budget, if any (the ETA is whichever ends first).
        log: where status lines go.
        wandb: also log to Weights & Biases (``wandb.init`` with the project ``vla-rollout``);
            an error names the missing package when it is not installed.
        start_step: the first iteration of this process (a resumed run continues its curve).
    """

    def __init__(
        self,
        out: str | None,
        iterations: int,
        minutes: float | None,
        log: Log = print,
        wandb: bool = False,
        start_step: int = 0,
    ) -> None:
        self.iterations, self.minutes, self.log = iterations, minutes, log
        self.writer = None
        if out is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                log("no TensorBoard logs: pip install -e '.[train]' (tensorboard)")
            else:
                self.writer = SummaryWriter(f"{out}/tb", purge_step=start_step or None)
        self.wandb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError as exc:
                raise ImportError("--wandb needs the wandb package (pip install wandb)") from exc
            self.wandb = wb.init(project="vla-rollout", dir=out)
        self._walls: list[float] = []
        self._t = time.perf_counter()

    def _scalars(self, prefix: str, step: int, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if self.writer is not None:
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def iteration(self, rec: dict) -> None:
        """Log one iteration's record (``run_iterations``'s) and print its status line."""
        it = rec["iteration"]
        steps_per_s = rec.get("env_steps_delta", 0) / max(rec.get("iteration_s", 0.0), 1e-9)
        self._scalars("train", it, {**rec, "env_steps_per_s": steps_per_s})
        self._walls.append(rec.get("iteration_s", 0.0))
        left = (self.iterations - it - 1) * statistics.median(self._walls)
        if self.minutes is not None:
            left = min(left, max(0.0, self.minutes * 60 - rec.get("wall_s", 0.0)))
        m, s = divmod(int(left), 60)
        self.log(
            f"it {it + 1}/{self.iterations} | success {rec.get('success_at_end', 0):.2f} "
            f"(once {rec.get('success_once', 0):.2f}) | {steps_per_s:,.0f} env steps/s | "
            f"ETA {m}m{s:02d}s"
        )

    def evaluation(self, ev: dict) -> None:
        """Log one held-out evaluation (at iteration ``ev["iteration"]``)."""
        self._scalars("eval", ev["iteration"], ev)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()

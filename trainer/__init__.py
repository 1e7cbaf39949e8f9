"""A reference GRPO trainer on the rollout engine: a CLI (``python -m trainer``) and the
small API it is built from, to copy into a trainer of your own.

Example:
    >>> from trainer import TrainConfig, train
    >>> curve = train(TrainConfig(env="toy", env_kwargs={"task": "reach"}, bc_demos=0))
"""

from trainer.ablations import Ablated, ablation_success
from trainer.bc import action_tokens, behaviour_clone, collect_demos
from trainer.checkpoints import load_checkpoint, load_resume, save_checkpoint, save_resume
from trainer.grpo import (
    add_proximal_log_probs,
    dynamic_sample,
    evaluate,
    group_advantages,
    grpo_loss,
)
from trainer.loop import (
    TrainConfig,
    learning_rate,
    run_iterations,
    toy_reach_config,
    train,
)
from trainer.perception import PrivilegedHead, pretrain_perception, reset_scenes
from trainer.runlog import RunLog
from trainer.video import EvalVideo

__all__ = [
    "Ablated",
    "EvalVideo",
    "PrivilegedHead",
    "RunLog",
    "TrainConfig",
    "ablation_success",
    "load_resume",
    "save_resume",
    "add_proximal_log_probs",
    "action_tokens",
    "behaviour_clone",
    "collect_demos",
    "dynamic_sample",
    "evaluate",
    "group_advantages",
    "grpo_loss",
    "learning_rate",
    "pretrain_perception",
    "reset_scenes",
    "load_checkpoint",
    "run_iterations",
    "save_checkpoint",
    "toy_reach_config",
    "train",
]

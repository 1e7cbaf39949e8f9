"""Reference policies. Each is a ``torch.nn.Module`` over the canonical VLA TensorDict."""

from pipeline.policies.expert import ExpertPolicy
from pipeline.policies.latency import LatencyPolicy
from pipeline.policies.tinyvla import TinyVLA

__all__ = ["ExpertPolicy", "LatencyPolicy", "TinyVLA"]

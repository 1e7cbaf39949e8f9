"""``python -m trainer``: warm start plus GRPO on one env; writes curve.json and curve.png."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

from trainer.loop import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Failed to find system libvulkan")
    ap = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, dict):
            ap.add_argument(flag, type=json.loads, default=value, help="JSON")
        elif f.name in ("minutes",):
            ap.add_argument(flag, type=float, default=value)
        elif f.name in ("warm_start", "out"):
            ap.add_argument(flag, type=str, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    args = ap.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    train(cfg, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`rlhfkern train|plan [config.yaml] [key.path=value ...]` (also `python -m rlhfkern ...`)."""

import sys

from .config import ConfigError, default_config_path, load_config


def main(command, config_path=None, overrides=()):
    path = config_path or default_config_path()
    try:
        cfg = load_config(path, overrides)
        if command == "plan":
            from .memory import check_memory, estimate
            from .placement import plan_text

            memory = estimate(cfg)
            print(plan_text(cfg, memory))
            check_memory(memory)
            return 0
        from .loop import Engine  # prints the same report, with nodes and GPUs, once placed

        engine = Engine(cfg)
        try:
            engine.learn()
        finally:
            engine.shutdown()
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    return 0


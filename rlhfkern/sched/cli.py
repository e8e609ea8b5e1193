"""`rlhfkern train|plan [config.yaml] [key.path=value ...]` (also `python -m rlhfkern ...`)."""

import sys

from .config import ConfigError, default_config_path, load_config


def main(command, config_path=None, overrides=()):
    path = config_path or default_config_path()
    try:
        cfg = load_config(path, overrides)
        from .placement import plan_text

        print(plan_text(cfg))
        if command == "plan":
            return 0
        from .loop import Engine

        engine = Engine(cfg)
        try:
            engine.learn()
        finally:
            engine.shutdown()
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    return 0


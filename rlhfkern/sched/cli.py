"""`rlhfkern train|plan [config.yaml] [key.path=value ...]` (also `python -m rlhfkern ...`)."""

import os
import sys

from .config import ConfigError, default_config_path, load_config


def main(command, config_path=None, overrides=(), resume=False):
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
            steps = None
            if resume:
                from .loop import checkpoints

                root = cfg.checkpoint.dir or os.path.join(cfg.logging.run_dir, "checkpoints")
                found = checkpoints(root)
                if not found:
                    print(f"--resume: no checkpoint in {root}", file=sys.stderr)
                    return 2
                engine.resume(found[-1])
                steps = cfg.train.steps - engine.step
                print(f"resumed from {found[-1]} (step {engine.step}); {max(steps, 0)} steps to go", flush=True)
            if steps is None or steps > 0:
                engine.learn(steps)
        finally:
            engine.shutdown()
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    return 0


"""`rlhfkern train|plan [config.yaml] [key.path=value ...]` and `rlhfkern generate --checkpoint
DIR --prompts FILE` (also `python -m rlhfkern ...`)."""

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
            if resume:
                latest = engine.latest_checkpoint()
                stages = [s for s in cfg.stages if os.path.exists(os.path.join(cfg.checkpoint_dir(), s, "stage.json"))]
                if latest is None and not stages:
                    print(f"--resume: no checkpoint in {cfg.checkpoint_dir()}", file=sys.stderr)
                    return 2
                print(f"resuming from {latest or 'the finished stages ' + ', '.join(stages)}", flush=True)
            engine.run(resume=resume)
        finally:
            engine.shutdown()
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    return 0



def model_folder(checkpoint):
    """The HF model folder of a checkpoint: DIR itself (config.json there: any saved model, e.g.
    <step>/policy/rank_0) or a step folder's policy rank 0."""
    for folder in (checkpoint, os.path.join(checkpoint, "policy", "rank_0")):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(f"{checkpoint}: no model there (no config.json in it nor in its policy/rank_0)")


def generate(checkpoint, prompts_path, out=None, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0,
             batch_size=256):
    """Offline batch inference: the answers of the model at `checkpoint` to the prompts of an RL
    JSON Lines file ({"prompt": str} a line), one {"prompt", "response"} line each, to `out` (or
    stdout). Text <-> tokens: the folder's own tokenizer when it has one, else the digit tasks'
    symbols. Greedy unless temperature > 0."""
    import json

    import torch
    import transformers

    from .actors import decode
    from .data import TextCodec, read_jsonl

    records = read_jsonl(prompts_path, "rl")  # every line checked before the model loads
    folder = model_folder(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    codec = TextCodec(folder, model.config.vocab_size, model.config.eos_token_id)
    sink = open(out, "w") if out else sys.stdout
    try:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            resp, mask, _ = decode(model, [codec.prompt(r.prompt) for r in batch], max_new_tokens, temperature, top_p,
                                   seed + start)
            for r, ids, m in zip(batch, resp, mask):
                sink.write(json.dumps({"prompt": r.prompt, "response": codec.text(ids[:int(m.sum())].tolist())}) + "\n")
    finally:
        if out:
            sink.close()
    return 0

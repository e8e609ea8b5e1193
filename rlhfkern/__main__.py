"""`python -m rlhfkern info`: versions, what was built, which backends run here."""

import argparse
import os
import platform
import sys

import torch

from . import __version__, _dispatch


def info():
    built = _dispatch.build_info()
    lines = [
        f"rlhfkern     {__version__}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton       {triton.__version__}" + (" (interpreter)" if _dispatch.triton_interpreted() else ""))
    except ImportError:
        lines.append("triton       not installed")
    ext_error = _dispatch.EXTENSION_ERROR
    lines.append("extension    " + ("rlhfkern._C loaded" if ext_error is None else ext_error))
    lines.append(f"built        cpu={built['cpu']} openmp={built['openmp']} cuda={built['cuda']}"
                 + (f" arches={built['cuda_arches']}" if built["cuda"] else ""))
    lines.append(f"GPU          {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    gpu = torch.cuda.is_available()
    for b, device in (("torch", "cpu"), ("cpu", "cpu"), ("triton", "cuda" if gpu else "cpu"), ("cuda", "cuda")):
        reason = _dispatch.why_unavailable(b, device)
        lines.append(f"backend {b:7s}" + (f"runs on {device} tensors" if reason is None else f"unavailable: {reason}"))
    lines.append(f"usable       {_dispatch.backends()}")
    return "\n".join(lines)


def parse_layout(text, spec):
    """'megatron:tp=2,pp=1' | 'vllm:tp=4' | 'hf' -> a layout of rlhfkern.reshard."""
    from .reshard import HFLayout, MegatronLayout, VLLMLayout

    kind, _, args = text.partition(":")
    opts = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        if key not in ("tp", "pp") or not value.isdigit():
            raise SystemExit(f"bad layout option {item!r} in {text!r}: expected tp=N or pp=N")
        opts[key] = int(value)
    if kind == "megatron":
        return MegatronLayout(spec, opts.get("tp", 1), opts.get("pp", 1))
    if kind == "vllm" and "pp" not in opts:
        return VLLMLayout(spec, opts.get("tp", 1))
    if kind == "hf" and not opts:
        return HFLayout(spec)
    raise SystemExit(f"bad layout {text!r}: expected megatron:tp=A,pp=B, vllm:tp=C or hf")


def reshard(args):
    from transformers import AutoConfig

    from .reshard import ModelSpec, plan_reshard

    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(args.hf_config))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        plan = plan_reshard(parse_layout(args.src, spec), parse_layout(args.dst, spec), colocated=args.colocated,
                            dtype=dtype)
    except ValueError as e:
        raise SystemExit(str(e))
    plan.verify()
    return plan.summary()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rlhfkern")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, what was built, which backends run here")
    rs = sub.add_parser("reshard", help="the summary of a resharding plan (bytes per rank vs lower bound and broadcast)")
    rs.add_argument("--hf-config", required=True, help="a HF model folder (config.json) or config file")
    rs.add_argument("--src", required=True, help="megatron:tp=A,pp=B | vllm:tp=C | hf")
    rs.add_argument("--dst", required=True, help="megatron:tp=A,pp=B | vllm:tp=C | hf")
    rs.add_argument("--colocated", action="store_true", help="destination rank i shares source rank i's process")
    rs.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    for name, what in (("train", "run the RLHF loop of a config (default: the shipped tiny GRPO run)"),
                       ("plan", "print a config's placement, phase schedule and memory estimate; start nothing")):
        p = sub.add_parser(name, help=what)
        p.add_argument("config", nargs="?", default=None, help="a YAML file (default: rlhfkern/sched/configs/default.yaml)")
        p.add_argument("overrides", nargs="*", help="key.path=value (value parsed as YAML), e.g. train.steps=20")
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint in checkpoint.dir up to train.steps")
    g = sub.add_parser("generate", help="offline batch inference of a checkpoint's model on an RL prompts file")
    g.add_argument("--checkpoint", required=True, help="a checkpoint's step folder, or any saved model folder")
    g.add_argument("--prompts", required=True, help='JSON Lines, {"prompt": str} a line')
    g.add_argument("--out", default=None, help="JSON Lines of {prompt, response} (default: stdout)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command in ("train", "plan"):
        return engine_command(args)
    if args.command == "generate":
        from .sched import cli

        try:
            return cli.generate(args.checkpoint, args.prompts, args.out, args.max_new_tokens, args.temperature,
                                args.top_p, args.seed)
        except (ValueError, FileNotFoundError) as e:  # a bad prompts file (DataError), checkpoint or vocabulary
            print(f"rlhfkern generate: {e}", file=sys.stderr)
            return 2
    print(info() if args.command == "info" else reshard(args))
    return 0


def engine_command(args):
    from .sched import cli

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):  # only overrides were given
        config, overrides = None, [config] + overrides
    return cli.main(args.command, config, overrides, resume=getattr(args, "resume", False))


def console():
    """The `rlhfkern` console script."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())

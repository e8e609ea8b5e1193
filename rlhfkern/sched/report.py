"""What a run shows and leaves behind: a tqdm bar (reward, KL, tokens/s), metrics.jsonl,
TensorBoard events and curve.png (reward and held-out metric per step) in the run folder, and a
closing table (metric at the start vs the end, seconds per phase)."""

import json
import os


class RunLog:
    def __init__(self, cfg, steps, append=False):
        self.cfg = cfg.logging
        self.dir = self.cfg.run_dir
        os.makedirs(self.dir, exist_ok=True)
        self.jsonl = open(os.path.join(self.dir, "metrics.jsonl"), "a" if append else "w")
        self.tb = None
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))
        self.bar = None
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc="rlhf", unit="step", dynamic_ncols=True)
        self.steps, self.evals = [], []

    def start_steps(self):
        """The RL steps begin (after any stages): the bar's clock starts now."""
        if self.bar is not None:
            self.bar.reset()

    def eval(self, step, metrics):
        """The held-out evaluation (Engine.eval_metrics) at `step`."""
        self.evals.append((step, metrics["eval/exact"]))
        self._write({"step": step, **metrics})

    def _write(self, metrics):
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, metrics["step"])

    def step(self, metrics):
        self.steps.append((metrics["step"], metrics["reward"]))
        if "eval/exact" in metrics:
            self.evals.append((metrics["step"], metrics["eval/exact"]))
        self._write(metrics)
        if self.bar is not None:
            post = {"reward": f"{metrics['reward']:.3f}", "kl": f"{metrics.get('actor/kl_loss', 0.0):.4f}",
                    "tok/s": f"{metrics['tokens_per_second']:.0f}"}
            if self.evals:
                post["exact"] = f"{self.evals[-1][1]:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def stage(self, stage, step, steps, metrics):
        """A step of the sft / rm stage: a metrics.jsonl line ({"stage", "step", ...}), TensorBoard
        under the stage's names, a console line."""
        self._write({"stage": stage, "step": step, **metrics})
        text = f"{stage} {step}/{steps}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())
        if self.bar is None:
            if self.cfg.progress:
                print(text, flush=True)
        else:
            self.bar.write(text)

    def event(self, step, text):
        """Something the run did besides training (a worker lost and the run recovered): a line
        in metrics.jsonl and on the console."""
        self.jsonl.write(json.dumps({"step": step, "event": text}) + "\n")
        self.jsonl.flush()
        if self.bar is None:
            print(f"rlhfkern: {text}", flush=True)
        else:
            self.bar.write(f"rlhfkern: {text}")

    def finish(self, summary):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if self.cfg.plot:
            self._plot()
        print(table(summary))

    def _plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([s for s, _ in self.steps], [r for _, r in self.steps], label="train reward (mean)")
        ax.plot([s for s, _ in self.evals], [e for _, e in self.evals], "o-", label="held-out exact match")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(self.dir, "curve.png"), dpi=100)
        plt.close(fig)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self.jsonl.close()


STAGE_ROWS = {"sft": ("held-out exact match, after sft", "eval/exact"),
              "rm": ("reward model pairwise accuracy, held-out", "rm/eval_accuracy")}


def table(summary):
    rows = [(label, f"{summary['stages'][stage][key]:.3f}") for stage, (label, key) in STAGE_ROWS.items()
            if stage in summary.get("stages", {})]
    if "eval_end" not in summary:  # no rl stage
        return "\n".join(f"{k}  {v}" for k, v in rows)
    rows += [("held-out exact match, start" if not rows else "held-out exact match, rl start",
              f"{summary['eval_start']:.3f}"),
             ("held-out exact match, end", f"{summary['eval_end']:.3f}"),
             ("steps", str(summary["steps"])), ("seconds", f"{summary['seconds']:.1f}")]
    total = sum(summary["phase_seconds"].values()) or 1.0
    rows += [(f"  {p}", f"{s:.1f} s ({100 * s / total:.0f}%)") for p, s in summary["phase_seconds"].items() if s > 0]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if summary.get("memory"):
        from .memory import comparison_lines

        lines += ["", *comparison_lines(summary["memory"])]
    return "\n".join(lines)

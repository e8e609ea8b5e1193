"""TRL baselines of bench/bench_engine.py (and bench/bench_trl.py), run step by step from the
benchmark process; `Child` is the benchmark's end of the protocol.

    python bench/trl_baseline.py SPEC.json

SPEC (written by bench_engine.py) names the trainer (``grpo``: trl's GRPOTrainer, ``ppo``:
trl.experimental.ppo.PPOTrainer of trl 1.12), the saved initial models, the prompts (token ids)
and the engine's hyper-parameters. This file runs in whichever venv has that TRL (PPO needs
trl 1.12, which is not the project's venv), so it imports nothing from rlhfkern but the task
file, loaded by path.

Protocol on stdout (everything else the trainer prints goes to stderr): ``READY {json}`` once the
trainer is built (the json has the policy's weight digest), then, for every ``go`` line read from
stdin, ``steps_per_round`` RL steps (each: generate one batch of prompts x samples, score it,
train on it) answered by ``STEP {json}`` (tokens generated over them, mean reward); after the last step the trainer waits for ``end``
(so that its wind-down runs beside no other system's step), then says ``END`` and exits. A step's
wall time is measured by the caller around that exchange.
"""

import hashlib
import importlib.util
import json
import os
import sys
import time



def load_tasks(path):
    spec = importlib.util.spec_from_file_location("rlhfkern_tasks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the digit tasks' symbols, one a token id, from rlhfkern/sched/tasks.py (loaded by path)
SYMBOLS = load_tasks(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "rlhfkern", "sched",
                                  "tasks.py")).SYMBOLS


def vocabulary(size=len(SYMBOLS)):
    """The digit tasks' symbols, then filler words v14, v15, ... up to `size` (a model whose
    vocabulary is larger than the tasks': every id it can sample has a word)."""
    return SYMBOLS + [f"v{i}" for i in range(len(SYMBOLS), size)]


def tokenizer(symbols=SYMBOLS):
    """A fast tokenizer of the symbols (by default the 14-token vocabulary), one token per
    whitespace-separated symbol, that adds no special tokens (prompts carry their own BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>", padding_side="left")


def to_text(ids):
    return " ".join(SYMBOLS[i] for i in ids)


def weight_digest(named_parameters):
    """sha256 over the parameters' bytes in name order (the same initial weights everywhere)."""
    h = hashlib.sha256()
    for name, p in sorted(named_parameters, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Channel:
    """Stdout is the protocol; the trainers' own prints are sent to stderr."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, kind, payload=None):
        self.out.write(kind + ("" if payload is None else " " + json.dumps(payload)) + "\n")

    def wait_go(self, word="go"):
        line = sys.stdin.readline()
        if line.strip() != word:
            raise SystemExit(f"{os.path.basename(sys.argv[0])}: expected {word!r}, got {line!r}")


def gate_callback(channel, every, steps, counter, digest_of):
    from transformers import TrainerCallback

    class Gate(TrainerCallback):
        """Holds the trainer before its first step and after every round (`every` optimizer
        steps) until the caller says go; `steps`: the rounds."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            import torch
            import transformers
            import trl

            channel.send("READY", {"digest": digest_of(model), "pids": [os.getpid()], "trl": trl.__version__,
                                   "transformers": transformers.__version__, "torch": torch.__version__,
                                   "threads": torch.get_num_threads()})
            channel.wait_go()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every:
                return
            channel.send("STEP", counter.take())
            channel.wait_go("go" if state.global_step // every < steps else "end")

    return Gate()


class Counter:
    """Response tokens (up to and including EOS, the engine's count) and rewards since the last step."""

    def __init__(self):
        self.tokens, self.rewards = 0, []

    def add(self, lengths, rewards):
        self.tokens += int(sum(lengths))
        self.rewards += [float(r) for r in rewards]

    def take(self):
        out = {"tokens_generated": self.tokens, "sequences": len(self.rewards),
               "reward": sum(self.rewards) / max(len(self.rewards), 1), "time": time.time()}
        self.tokens, self.rewards = 0, []
        return out


def common_args(s):
    logging = {"logging_steps": s["logging_steps"]} if "logging_steps" in s else {}  # else each trainer's default
    return dict(output_dir=s["work_dir"], learning_rate=s["lr"], seed=s["seed"],
                lr_scheduler_type="constant", bf16=False, fp16=False, use_cpu=True, report_to="none",
                save_strategy="no", eval_strategy="no", **logging)


def run_grpo(s, channel, tasks, counter, callbacks=()):
    """Trains GRPOTrainer over the spec (s["vocab"]: the tokenizer's size, default the tasks' 14
    symbols), gated by the channel; `callbacks` follow the gate. Returns the trainer."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def rule_reward(prompts, completions, completion_ids, **kwargs):
        ids = [[SYMBOLS.index(w) for w in p.split()] for p in prompts]
        rewards = getattr(tasks, s["reward"])(ids, completion_ids)
        counter.add(map(len, completion_ids), rewards)
        return rewards

    rule_reward.__name__ = s["reward"]
    per_gen = s["prompts_per_step"] * s["samples"]
    mb = s["minibatch"]
    args = GRPOConfig(**common_args(s), per_device_train_batch_size=mb, gradient_accumulation_steps=1,
                      steps_per_generation=per_gen // mb, num_iterations=s["ppo_epochs"],
                      num_generations=s["samples"], max_completion_length=s["max_new_tokens"],
                      temperature=s["temperature"], top_p=s["top_p"], beta=s["kl_coef"], epsilon=s["clip_low"],
                      epsilon_high=s["clip_high"], loss_type="dapo", scale_rewards="group",
                      max_grad_norm=s["grad_clip"],
                      max_steps=s["steps"] * s["steps_per_round"] * (per_gen // mb) * s["ppo_epochs"])
    data = Dataset.from_dict({"prompt": [to_text(p) for p in s["prompts"]]})
    every = (per_gen // mb) * s["ppo_epochs"] * s["steps_per_round"]  # optimizer steps per round
    trainer = GRPOTrainer(model=s["model_dir"], reward_funcs=[rule_reward], args=args, train_dataset=data,
                          processing_class=tokenizer(vocabulary(s.get("vocab", len(SYMBOLS)))),
                          callbacks=[gate_callback(channel, every, s["steps"], counter,
                                                   lambda m: weight_digest(m.named_parameters())), *callbacks])
    trainer.train()
    return trainer


class _Ids:
    pass


def rule_reward_module(tasks, fn_name, prompt_len, pad, eos, counter):
    """A reward "model" for trl 1.12's get_reward: `getattr(model, model.base_model_prefix)(input_ids=...)`
    then `model.score(hidden_states[-1])[b, sequence_length]`. The backbone passes the token ids
    through; the score head computes the rule reward of each row (prompt = the first `prompt_len`
    ids, response = what follows up to the first PAD, which trl puts after the first EOS) and
    returns it at every position, so the index trl reads gives exactly the rule reward."""
    import torch

    class Backbone(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            out = _Ids()
            out.hidden_states = (input_ids,)
            return out

    class Score(torch.nn.Module):
        def forward(self, ids):
            prompts, responses = [], []
            for row in ids.tolist():
                resp = row[prompt_len:]
                end = resp.index(pad) if pad in resp else len(resp)
                prompts.append(row[:prompt_len])
                responses.append(resp[:end])
            rewards = getattr(tasks, fn_name)(prompts, responses)
            counter.add(map(len, responses), rewards)
            r = torch.tensor(rewards, dtype=torch.float32)
            return r[:, None, None].expand(ids.shape[0], ids.shape[1], 1)

    class RuleReward(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.score = Score()

    return RuleReward()


def run_ppo(s, channel, tasks, counter):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    per_gen = s["prompts_per_step"] * s["samples"]
    mb = s["minibatch"]
    # trl 1.12: a batch is per_device_train_batch_size * gradient_accumulation_steps rollouts; it is cut
    # into num_mini_batches minibatches, one optimizer step each (a micro-batch slice covers the whole
    # minibatch, so no accumulation); rollouts are generated local_rollout_forward_batch_size at a time.
    args = PPOConfig(**common_args(s), per_device_train_batch_size=per_gen, gradient_accumulation_steps=1,
                     num_mini_batches=per_gen // mb, num_ppo_epochs=s["ppo_epochs"],
                     local_rollout_forward_batch_size=per_gen,
                     total_episodes=s["steps"] * s["steps_per_round"] * per_gen,
                     response_length=s["max_new_tokens"], temperature=s["temperature"], stop_token="eos",
                     kl_coef=s["kl_coef"], cliprange=s["clip_low"], max_grad_norm=s["grad_clip"],
                     num_sample_generations=0)
    policy = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    ref = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    value = AutoModelForTokenClassification.from_pretrained(s["value_dir"])
    tok = tokenizer()
    reward = rule_reward_module(tasks, s["reward"], max(map(len, s["prompts"])), tok.pad_token_id, tok.eos_token_id,
                                counter)
    rows = [p for p in s["prompts"] for _ in range(s["samples"])]
    data = Dataset.from_dict({"input_ids": rows})
    digest = weight_digest(policy.named_parameters())
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=data, value_model=value, eval_dataset=data.select(range(8)),
                         callbacks=[gate_callback(channel, s["steps_per_round"], s["steps"], counter,
                                                    lambda m: digest)])
    trainer.train()


def cpu_seconds(pids):
    """CPU seconds (user + system, all threads) used so far by a system's processes."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Child:
    """The benchmark's end of the protocol: one system in a process of its own (`script`, a file of
    bench/, run by `python` with the spec's path), its stderr in work/<name>.log; ready() waits for
    READY, step() releases one round and times it (wall and the processes' CPU seconds), close()
    returns END's payload."""

    def __init__(self, name, spec, python, script, work):
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        self.name = name
        path = work / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(spec))
        self.log_path = work / f"{name.replace(' ', '_')}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, os.path.join(here, script), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                     cwd=os.path.dirname(here),
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
                                          **spec.get("env", {})})
        self.info, self.steps, self.seconds, self.cpu = None, [], [], []

    def expect(self, kind):
        line = self.proc.stdout.readline()
        if not line.startswith(kind):
            self.proc.kill()
            self.log.flush()
            raise RuntimeError(f"{self.name}: expected {kind}, got {line!r}; its log ({self.log_path}) ends:\n"
                               + self.log_path.read_text()[-3000:])
        rest = line[len(kind):].strip()
        return json.loads(rest) if rest else None

    def ready(self):
        self.info = self.expect("READY")
        return self

    def step(self):
        t = time.perf_counter()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.steps.append(self.expect("STEP"))
        self.seconds.append(time.perf_counter() - t)
        self.cpu.append(cpu_seconds(self.info["pids"]))

    def close(self, finished):
        """Lets a child that ran all its rounds wind down (END's payload returned) or ends it."""
        end = None
        try:
            if finished:
                self.proc.stdin.write("end\n")
                self.proc.stdin.flush()
                end = self.expect("END")
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        return end


def main():
    with open(sys.argv[1]) as f:
        s = json.load(f)
    channel = Channel()
    import torch

    torch.set_num_threads(s["threads"])
    tasks = load_tasks(s["tasks_py"])
    counter = Counter()
    {"grpo": run_grpo, "ppo": run_ppo}[s["trainer"]](s, channel, tasks, counter)
    channel.send("END")


if __name__ == "__main__":
    main()

"""Tasks generated in code, with an exact held-out metric and a rule reward.

The default task, ``reverse``: the prompt is ``BOS d1 .. dk SEP`` (k digits drawn uniformly,
k in [min_digits, max_digits]), the answer ``dk .. d1 EOS``. A tiny transformer made from a
config learns it by RL alone within minutes on a CPU, so a run shows the metric rising.
``copy`` (answer ``d1 .. dk EOS``) is the easier variant.

Token ids: PAD 0, BOS 1, EOS 2, SEP 3, digit d -> 4 + d (vocabulary of 14).
"""

import random

PAD, BOS, EOS, SEP = 0, 1, 2, 3
DIGIT0 = 4
VOCAB_SIZE = DIGIT0 + 10
# the tasks' text form: one whitespace-separated symbol a token ("<s> 1 2 3 =")
SYMBOLS = ["<pad>", "<s>", "</s>", "="] + [str(d) for d in range(10)]


def encode(text):
    """Text of the tasks' symbols -> token ids; a prompt without its leading BOS gets one."""
    words = text.split()
    bad = [w for w in words if w not in SYMBOLS]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a symbol of the digit tasks (one of {' '.join(SYMBOLS)})")
    ids = [SYMBOLS.index(w) for w in words]
    return ids if ids[:1] == [BOS] else [BOS] + ids


def decode(ids):
    """Token ids -> text, up to and including the first EOS, PAD dropped."""
    out = []
    for i in ids:
        if i != PAD:
            out.append(SYMBOLS[i])
        if i == EOS:
            break
    return " ".join(out)


def _answer(kind, digits):
    if kind == "reverse":
        return digits[::-1]
    if kind == "copy":
        return list(digits)
    raise ValueError(f"unknown task kind {kind!r}: expected 'reverse' or 'copy'")


def digits_of(prompt):
    """The digits of a prompt (token ids), without BOS/SEP/PAD."""
    return [t - DIGIT0 for t in prompt if t >= DIGIT0]


def target_tokens(kind, prompt):
    """The exact answer of a prompt: answer digits as token ids, then EOS."""
    return [DIGIT0 + d for d in _answer(kind, digits_of(prompt))] + [EOS]


def score(kind, prompt, response):
    """Fraction of the answer's positions (EOS included) that the response gets right, minus
    nothing for extra tokens after EOS (generation stops there). In [0, 1]."""
    target = target_tokens(kind, prompt)
    hits = sum(1 for i, t in enumerate(target) if i < len(response) and response[i] == t)
    return hits / len(target)


def exact(kind, prompt, response):
    """1.0 when the response is the answer up to and including its EOS, else 0.0."""
    target = target_tokens(kind, prompt)
    return float(list(response[: len(target)]) == target)


class DigitTask:
    """Train prompts are sampled from every digit string outside the held-out set, which is fixed
    by `seed` and never trained on."""

    def __init__(self, kind="reverse", min_digits=2, max_digits=5, eval_prompts=256, seed=0):
        _answer(kind, [])  # validates kind
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.kind, self.min_digits, self.max_digits = kind, min_digits, max_digits
        rng = random.Random(seed)
        self.eval_set = []
        seen = set()
        while len(self.eval_set) < eval_prompts:
            p = self._sample(rng)
            if p not in seen:
                seen.add(p)
                self.eval_set.append(list(p))
        self._held_out = seen

    def _sample(self, rng):
        k = rng.randint(self.min_digits, self.max_digits)
        return (BOS, *(DIGIT0 + rng.randrange(10) for _ in range(k)), SEP)

    def train_prompts(self, n, rng):
        """n prompts (lists of token ids) drawn with `rng`, none from the held-out set."""
        out = []
        while len(out) < n:
            p = self._sample(rng)
            if p not in self._held_out:
                out.append(list(p))
        return out


def reverse_reward(prompts, responses):
    """Rule reward of the ``reverse`` task (``rlhfkern.sched.tasks:reverse_reward`` in a config):
    per sample, the fraction of answer positions right."""
    return [score("reverse", p, r) for p, r in zip(prompts, responses)]


def copy_reward(prompts, responses):
    """Rule reward of the ``copy`` task."""
    return [score("copy", p, r) for p, r in zip(prompts, responses)]

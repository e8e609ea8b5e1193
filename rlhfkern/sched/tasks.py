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


def encode(text, bos=True):
    """Text of the tasks' symbols -> token ids; with `bos` (a prompt), a leading BOS if it has none."""
    words = text.split()
    bad = [w for w in words if w not in SYMBOLS]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a symbol of the digit tasks (one of {' '.join(SYMBOLS)})")
    ids = [SYMBOLS.index(w) for w in words]
    return [BOS] + ids if bos and ids[:1] != [BOS] else ids


def decode(ids):
    """Token ids -> text, up to and including the first EOS, PAD dropped."""
    out = []
    for i in ids:
        if i != PAD:
            out.append(SYMBOLS[i])
        if i == EOS:
            break
    return " ".join(out)


def _text(ids):
    """Prompt or answer ids -> their text without BOS and EOS ("3 2 1"), as the data files hold it."""
    return " ".join(SYMBOLS[i] for i in ids if i not in (BOS, EOS, PAD))


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


OTHER = {"reverse": "copy", "copy": "reverse"}


def sft_records(task, n, wrong_fraction, rng):
    """`n` demonstrations {"query", "response"} on the task's training prompts: a `wrong_fraction`
    of them (drawn at random) give the other task's answer (an annotator's systematic mistake;
    the same answer when it reads the same both ways)."""
    out = []
    for prompt in task.train_prompts(n, rng):
        kind = OTHER[task.kind] if rng.random() < wrong_fraction else task.kind
        out.append({"query": _text(prompt), "response": _text(target_tokens(kind, prompt))})
    return out


def rm_records(task, n, rng):
    """`n` ranked records {"query", "response": [5 answers], "score": [their rule score]}: the
    right answer, the other task's, the right one with one digit changed, with one digit too
    many, random digits; in a random order."""
    out = []
    for prompt in task.train_prompts(n, rng):
        right = target_tokens(task.kind, prompt)
        typo = list(right)
        i = rng.randrange(len(typo) - 1)
        typo[i] = DIGIT0 + (typo[i] - DIGIT0 + rng.randrange(1, 10)) % 10
        noise = [DIGIT0 + rng.randrange(10) for _ in right[:-1]] + [EOS]
        longer = right[:-1] + [DIGIT0 + rng.randrange(10), EOS]
        answers = [right, target_tokens(OTHER[task.kind], prompt), typo, longer, noise]
        rng.shuffle(answers)
        out.append({"query": _text(prompt), "response": [_text(a) for a in answers],
                    "score": [score(task.kind, prompt, a) for a in answers]})
    return out


def reverse_reward(prompts, responses):
    """Rule reward of the ``reverse`` task (``rlhfkern.sched.tasks:reverse_reward`` in a config):
    per sample, the fraction of answer positions right."""
    return [score("reverse", p, r) for p, r in zip(prompts, responses)]


def copy_reward(prompts, responses):
    """Rule reward of the ``copy`` task."""
    return [score("copy", p, r) for p, r in zip(prompts, responses)]

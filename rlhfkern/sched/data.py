"""The pipeline's datasets: JSON Lines files, one record a line, in exactly these formats.

    sft   {"query": str, "response": str}                         supervised fine-tuning
    rm    {"query": str, "response": [str, ...], "score": [float, ...]}   reward model: ranked
          responses (at least two, one score each; higher = better)
    rl    {"prompt": str}                                         RL prompts

Every record is checked when the file is read, before any training starts: bad JSON, a record
that is not an object, a missing or unknown key, a wrong type, an empty string, a response/score
length mismatch, a non-finite score. The error names the file, the line number and what is
wrong (`data.jsonl:7: key 'score': 3 scores for 2 responses`). Blank lines are skipped.
"""

import json
import math
from typing import Annotated

import pydantic
from pydantic import BaseModel, ConfigDict, StringConstraints

NonEmpty = Annotated[str, StringConstraints(min_length=1), pydantic.Strict()]


class DataError(ValueError):
    """A dataset that cannot be used: `path:line: what is wrong`."""

    def __init__(self, path, line, message):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SFTRecord(_Record):
    query: NonEmpty
    response: NonEmpty


class RMRecord(_Record):
    query: NonEmpty
    response: list[NonEmpty]
    score: list[Annotated[float, pydantic.Strict()]]  # ints are taken; strings and booleans are not

    @pydantic.model_validator(mode="after")
    def _ranked(self):
        if len(self.response) < 2:
            raise ValueError(f"key 'response': {len(self.response)} response(s); a ranking needs at least 2")
        if len(self.score) != len(self.response):
            raise ValueError(f"key 'score': {len(self.score)} scores for {len(self.response)} responses")
        bad = [s for s in self.score if not math.isfinite(s)]
        if bad:
            raise ValueError(f"key 'score': non-finite score {bad[0]}")
        return self

    def pairs(self):
        """(better, worse) response index pairs: every pair with different scores."""
        n = len(self.response)
        return [(i, j) for i in range(n) for j in range(n) if self.score[i] > self.score[j]]


class RLRecord(_Record):
    prompt: NonEmpty


RECORDS = {"sft": SFTRecord, "rm": RMRecord, "rl": RLRecord}


def _problem(error):
    """One line from pydantic's first error, in the file's terms (keys, not model fields)."""
    e = error.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    kind, msg = e["type"], e["msg"]
    if kind == "missing":
        return f"missing key {where!r}"
    if kind == "extra_forbidden":
        return f"unknown key {where!r}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "string_too_short":
        return f"key {where!r}: empty string"
    return f"key {where!r}: {msg} (got {type(e.get('input')).__name__} {str(e.get('input'))[:60]!r})"


def read_jsonl(path, kind):
    """The records of a `kind` ("sft", "rm", "rl") file, all checked; DataError on the first bad one."""
    if kind not in RECORDS:
        raise ValueError(f"kind must be one of {sorted(RECORDS)}, got {kind!r}")
    record = RECORDS[kind]
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, n, f"a record must be a JSON object with keys {sorted(record.model_fields)}, "
                                         f"got {type(obj).__name__}")
            try:
                out.append(record.model_validate(obj))
            except pydantic.ValidationError as e:
                raise DataError(path, n, _problem(e)) from None
    if not out:
        raise DataError(path, 0, "no records")
    return out


def write_jsonl(path, records):
    """Records (dicts or record objects) to a JSON Lines file."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.model_dump() if isinstance(r, BaseModel) else r) + "\n")


class TextCodec:
    """Text <-> token ids for the pipeline's files and `rlhfkern generate`: a model folder's own
    tokenizer when it has one, else the digit tasks' symbols (tasks.SYMBOLS; only for a model of
    their vocabulary). A prompt gets the tokenizer's special tokens (BOS); a response none, and
    ends with EOS (appended unless the text has it) so that a trained model learns to stop."""

    def __init__(self, folder, vocab_size, eos_id):
        import os

        from . import tasks

        self.eos = eos_id
        if folder is not None and os.path.exists(os.path.join(folder, "tokenizer_config.json")):
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(folder)
            self._prompt = tok.encode
            self._response = lambda text: tok.encode(text, add_special_tokens=False)
            self.text = lambda ids: tok.decode(ids, skip_special_tokens=True)
        elif vocab_size == tasks.VOCAB_SIZE:
            self._prompt, self._response, self.text = tasks.encode, lambda t: tasks.encode(t, bos=False), tasks.decode
        else:
            raise ValueError(f"{folder or 'the model'}: no tokenizer files, and a vocabulary of {vocab_size} "
                             f"is not the digit tasks' {tasks.VOCAB_SIZE}")

    def prompt(self, text):
        return list(self._prompt(text))

    def response(self, text):
        ids = list(self._response(text))
        return ids if ids[-1:] == [self.eos] else ids + [self.eos]

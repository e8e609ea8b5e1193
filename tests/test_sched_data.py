"""The pipeline's JSON Lines datasets (rlhfkern.sched.data): the three formats read back, and
every malformed record stops the read with the file, the line number and what is wrong."""

import pytest

from conftest import need  # noqa: E402

need("pydantic", extra="ray")

from rlhfkern.sched.data import DataError, RMRecord, read_jsonl, write_jsonl


def write(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    return str(path)


def test_the_three_formats_round_trip(tmp_path):
    sft = [{"query": "1 2 3 =", "response": "3 2 1"}, {"query": "4 =", "response": "4"}]
    rm = [{"query": "1 2 =", "response": ["2 1", "1 2", "2"], "score": [1.0, 0, 0.5]}]
    rl = [{"prompt": "7 8 9 ="}]
    for kind, records in (("sft", sft), ("rm", rm), ("rl", rl)):
        path = str(tmp_path / f"{kind}.jsonl")
        write_jsonl(path, records)
        got = read_jsonl(path, kind)
        assert [r.model_dump() for r in got] == [{k: ([float(x) for x in v] if k == "score" else v)
                                                   for k, v in r.items()} for r in records]
    # blank lines are skipped
    assert len(read_jsonl(write(tmp_path, '{"prompt": "a"}\n\n{"prompt": "b"}\n'), "rl")) == 2


def test_rm_pairs_order_by_score():
    r = RMRecord(query="q", response=["a", "b", "c", "d"], score=[0.5, 2.0, 0.5, -1])
    assert sorted(r.pairs()) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]  # ties give no pair


BAD = [
    ("sft", '{"query": "a", "response": "b"}\n{"query": "a", "response": "b"', 2, "not valid JSON"),
    ("sft", '["a", "b"]', 1, "must be a JSON object"),
    ("sft", '{"query": "a"}', 1, "missing key 'response'"),
    ("sft", '{"query": "a", "response": "b", "reward": 1}', 1, "unknown key 'reward'"),
    ("sft", '{"query": "a", "response": ""}', 1, "key 'response': empty string"),
    ("sft", '{"query": 3, "response": "b"}', 1, "key 'query'"),
    ("rm", '{"query": "a", "response": ["x", "y"], "score": [1.0]}', 1, "1 scores for 2 responses"),
    ("rm", '{"query": "a", "response": ["x"], "score": [1.0]}', 1, "a ranking needs at least 2"),
    ("rm", '{"query": "a", "response": ["x", ""], "score": [1.0, 0.0]}', 1, "key 'response.1': empty string"),
    ("rm", '{"query": "a", "response": ["x", "y"], "score": [1.0, "high"]}', 1, "key 'score.1'"),
    ("rm", '{"query": "a", "response": ["x", "y"], "score": [1.0, NaN]}', 1, "non-finite score"),
    ("rl", '{"prompt": "a"}\n{"prompt": "b"}\n{"query": "c"}', 3, "missing key 'prompt'"),
    ("rl", "\n\n", 0, "no records"),
]


@pytest.mark.parametrize("kind,text,line,message", BAD, ids=[b[3] for b in BAD])
def test_a_malformed_record_names_file_line_and_problem(tmp_path, kind, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        read_jsonl(path, kind)
    assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
    assert message in str(e.value), str(e.value)
    assert e.value.line == line


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        read_jsonl("x.jsonl", "dpo")

"""Prompt-file parsing: every format, every field alias and every rejection reason."""
import json

import pytest

from dtm_core import DTMError
from dtm_core.measure.prompts import MAX_PROMPTS, load_prompts, parse_prompt_bytes


def test_txt_lines_and_blank_lines_reported():
    ps = parse_prompt_bytes(b"first\nsecond\n\nthird\n\n", "p.txt")
    assert ps.prompts == ["first", "second", "third"]
    assert ps.rejected == [(3, "empty line")]
    assert "line 3: empty line" in ps.rejection_message()


def test_jsonl_aliases_answers_context_choices_and_bad_lines():
    lines = [
        json.dumps({"question": "Capital of France?", "answers": ["Paris", "paris"]}),
        "{not json",
        json.dumps({"instruction": "Say hi", "target": "hi"}),
        json.dumps({"foo": 1}),
        json.dumps({"input": "Q?", "context": "Passage.", "answer": "x"}),
        json.dumps({"prompt": "2+2?", "choices": ["3", "4"], "answer": "B"}),
        json.dumps([1, 2]),
    ]
    ps = parse_prompt_bytes("\n".join(lines).encode(), "set.jsonl")
    assert [r.line for r in ps.records] == [1, 3, 5, 6]
    assert ps.records[0].answers == ("Paris", "paris")
    assert ps.records[1].answers == ("hi",)
    assert ps.records[2].text().startswith("Passage.\n\nQ?")
    assert ps.records[3].answers == ("B",) and ps.records[3].text().endswith("A. 3\nB. 4\nAnswer:")
    assert [n for n, _ in ps.rejected] == [2, 4, 7]
    assert "malformed JSON" in ps.rejected[0][1] and "no prompt field" in ps.rejected[1][1]


def test_csv_header_aliases_and_errors():
    ps = parse_prompt_bytes(b"text,answer\nhello,world\n\"a, b\",c\n", "x.csv")
    assert ps.prompts == ["hello", "a, b"] and ps.records[0].answers == ("world",)
    with pytest.raises(DTMError, match="no prompt column"):
        parse_prompt_bytes(b"foo,bar\n1,2\n", "x.csv")
    ps = parse_prompt_bytes(b"prompt,answer\nok,1\nbad\n", "x.csv")
    assert ps.rejected and ps.rejected[0][0] == 3


@pytest.mark.parametrize("data,name,match", [
    (b"", "e.txt", "empty"),
    (b"   \n\n", "e.txt", "empty"),
    (b"\xff\xfe\xfa bad", "b.txt", "not UTF-8"),
    (b"abc\x00\x01\x02", "b.txt", "binary"),
    (b"x" * (10 * 1024 * 1024 + 1), "big.txt", "10 MB"),
    (b"hi", "p.pdf", ".txt, .jsonl or .csv"),
    (b"{bad\n{worse\n", "j.jsonl", "no usable prompt"),
])
def test_unusable_files(data, name, match):
    with pytest.raises(DTMError, match=match):
        parse_prompt_bytes(data, name)


def test_too_many_prompts():
    data = "\n".join(f"p{i}" for i in range(MAX_PROMPTS + 1)).encode()
    with pytest.raises(DTMError, match="limit is 5000"):
        parse_prompt_bytes(data, "many.txt")


def test_load_from_path_and_missing(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n")
    assert load_prompts(str(f)).prompts == ["one", "two"]
    with pytest.raises(DTMError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))

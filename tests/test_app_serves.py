"""The app starts and serves on 127.0.0.1."""
import urllib.request

from apphelpers import running_app
from conftest import WAIT_S


def test_app_serves_on_loopback():
    with running_app() as url:
        assert url.startswith("http://127.0.0.1:")
        html = urllib.request.urlopen(url, timeout=WAIT_S).read().decode()
        assert "DTM Inspector" in html or "gradio" in html.lower()

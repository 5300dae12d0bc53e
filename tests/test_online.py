"""may_download: when a lesson cell may use the network, tested without the network.

The hub is played by servers on this machine: one that answers HTTP, one that
accepts connections and never answers, and a port where nothing listens.
"""

import http.server
import socket
import sys
import threading
import time
import types

import pytest

from sdscratch.online import may_download, reachable

SERVICES = ("google.colab",)
SERVICE_VARIABLES = ("KAGGLE_KERNEL_RUN_TYPE",)


class Quiet(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404 if self.path == "/missing" else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    """An HTTP server on localhost: its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent():
    """A port that accepts connections and never says a word: its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture
def closed():
    """A port where nothing listens: its URL."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def laptop(monkeypatch):
    """A plain machine: not Colab, not Kaggle, no switch, no proxy, hub allowed."""
    for name in SERVICES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in (
        *SERVICE_VARIABLES,
        "SDSCRATCH_ONLINE",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_laptop_does_not_download_unless_asked(laptop, hub):
    laptop.setenv("HF_ENDPOINT", hub)  # the hub is up, yet nobody asked
    access = may_download("the real SD v1.5 weights (~2 GB)")
    assert not access
    assert access.reason == (
        "Skipped: this cell downloads the real SD v1.5 weights (~2 GB); it runs on "
        "Colab/Kaggle, or locally with SDSCRATCH_ONLINE=1."
    )


def test_a_laptop_downloads_when_asked_and_the_hub_answers(laptop, hub):
    laptop.setenv("HF_ENDPOINT", hub)
    laptop.setenv("SDSCRATCH_ONLINE", "1")
    access = may_download()
    assert access and access.reason == ""


def test_colab_downloads_without_being_asked(laptop, hub):
    laptop.setenv("HF_ENDPOINT", hub)
    laptop.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert may_download()


def test_kaggle_downloads_without_being_asked(laptop, hub):
    laptop.setenv("HF_ENDPOINT", hub)
    laptop.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert may_download()


def test_switched_off_everywhere_with_zero(laptop, hub):
    laptop.setenv("HF_ENDPOINT", hub)
    laptop.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    laptop.setenv("SDSCRATCH_ONLINE", "0")
    access = may_download("x")
    assert not access and "SDSCRATCH_ONLINE=0" in access.reason


def test_hub_offline_wins_over_the_switch(laptop, hub):
    laptop.setenv("HF_ENDPOINT", hub)
    laptop.setenv("SDSCRATCH_ONLINE", "1")
    laptop.setenv("HF_HUB_OFFLINE", "1")
    access = may_download("x")
    assert not access and "HF_HUB_OFFLINE" in access.reason


def test_a_bad_switch_value_is_one_clear_sentence(laptop):
    laptop.setenv("SDSCRATCH_ONLINE", "yes please")
    with pytest.raises(ValueError, match="SDSCRATCH_ONLINE must be 1"):
        may_download()


def test_an_unreachable_hub_is_false_quickly(laptop, closed):
    laptop.setenv("HF_ENDPOINT", closed)
    laptop.setenv("SDSCRATCH_ONLINE", "1")
    start = time.perf_counter()
    access = may_download("x", timeout=2.0)
    assert time.perf_counter() - start < 1.0  # refused: no need to wait
    assert not access and f"{closed} did not answer within 2 s" in access.reason


def test_a_silent_hub_is_given_up_after_the_timeout(laptop, silent):
    laptop.setenv("HF_ENDPOINT", silent)
    laptop.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    start = time.perf_counter()
    access = may_download("x", timeout=0.5)
    assert time.perf_counter() - start < 1.5
    assert not access
    assert access.reason.endswith(
        "(on Kaggle, switch Internet on in the notebook's settings)."
    )


def test_any_http_answer_counts_as_reachable(laptop, hub):
    assert reachable(f"{hub}/missing", timeout=2.0)  # 404: the server is there
    assert not reachable("not a url", timeout=2.0)

"""The start-up speed work of `infra/startup.py`: each shortcut answers as what it replaces.

Run: `.venv/bin/python -m pytest tests/unit/test_startup.py -q` (a few seconds).
"""

import functools
import gc
import http.server
import subprocess
import sys
import threading

import pytest

from infra import startup


def test_the_cheap_dependency_check_answers_as_datatroves_own():
    """datatrove's `_is_distribution_available` parses every installed package's metadata per name; ours looks the
    name up. Same answers for installed, absent and hyphenated names, and it is the one datatrove's checks call."""
    from datatrove.utils import _import_utils

    own = startup.patch_datatrove_dependency_check()
    assert startup.patch_datatrove_dependency_check() is own  # idempotent: patched once, datatrove's own kept
    names = ["trafilatura", "fasttext-numpy2-wheel", "fasttext", "no-such-distribution-gptflow", "kenlm", "xxhash"]
    assert [startup.distribution_installed(n) for n in names] == [own.__wrapped__(n) for n in names]
    assert startup.distribution_installed("trafilatura") is True
    assert startup.distribution_installed("no-such-distribution-gptflow") is None
    assert _import_utils._is_distribution_available.__wrapped__ is startup.distribution_installed
    with pytest.raises(ImportError, match="no-such-distribution-gptflow"):  # a missing one still stops the block
        _import_utils.check_required_dependencies("Step", [("xxhash", "no-such-distribution-gptflow")])


def test_importing_the_data_blocks_applies_the_patch_as_workers_need():
    """Workers get the patch by importing our blocks (the forkserver preloads them)."""
    code = ("import tasks.data.blocks; from datatrove.utils import _import_utils; "
            "from infra.startup import distribution_installed; "
            "assert _import_utils._is_distribution_available.__wrapped__ is distribution_installed")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_route_warm_up_waits_for_health_then_sends_one_request():
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  http.server's name
            requests.append(self.path)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        warmed = threading.Event()
        startup.warm_up_routes(f"http://127.0.0.1:{httpd.server_address[1]}/api", lambda: True, warmed)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert warmed.is_set() and requests == ["/api/health", "/api/gptflow-warm-up"]
    gone = threading.Event()
    startup.warm_up_routes("http://127.0.0.1:9/api", functools.partial(bool, 0), gone)  # a server that exited
    assert gone.is_set()


def test_freeze_heap_moves_live_objects_to_the_permanent_generation():
    try:
        startup.freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()

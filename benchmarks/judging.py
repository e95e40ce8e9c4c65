"""Judging throughput (judgments/s) of the LLM judge against a local server at 1, 8, 32 in flight.

    python benchmarks/judging.py                         # stub server, 50 ms per request
    python benchmarks/judging.py --latency-ms 0          # client overhead alone
    python benchmarks/judging.py --server tiny           # tiny random Llama, real logprobs
    python benchmarks/judging.py --server transformers   # `transformers serve`, same tiny model
    python benchmarks/judging.py --base-url http://127.0.0.1:8000/v1 --model local-judge

The stub is a stdlib ThreadingHTTPServer in its own process that answers every chat completion
with a fixed "A"/"B" log-probability reply after --latency-ms, like a remote API or a GPU server
whose per-request latency dominates; it shows how well requests overlap. The tiny and
transformers servers do real (CPU) forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.judging import Candidate, JudgeSpec, PairwiseItem  # noqa: E402

TEST_SERVER = ROOT / "tests" / "tiny_server.py"


def serve_stub(latency_s: float) -> None:
    """Answer /v1/chat/completions with a canned logprob reply after latency_s; print the port."""
    reply = json.dumps({
        "id": "stub", "object": "chat.completion", "model": "stub",
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": "A"},
                     "logprobs": {"content": [{"token": "A", "logprob": -0.22, "top_logprobs": [
                         {"token": "A", "logprob": -0.22}, {"token": "B", "logprob": -1.6}]}]}}],
        "usage": {"prompt_tokens": 400, "completion_tokens": 1, "total_tokens": 401}}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers
        disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms per reply

        def do_GET(self):  # noqa: N802
            self._send(b'{"status":"ok"}')

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length", 0)))
            if latency_s:
                time.sleep(latency_s)
            self._send(reply)

        def _send(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # listen backlog: the default 5 resets bursts of connects
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


def _read_port(proc: subprocess.Popen, timeout_s: float) -> int:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    line = lines.get(timeout=timeout_s)
    if not line.startswith("PORT "):
        raise RuntimeError(f"server said {line!r}")
    return int(line.split()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy within {timeout_s}s")


def start_server(kind: str, latency_ms: float, workdir: Path) -> tuple[subprocess.Popen, str]:
    """Start the chosen local server; return the process and its /v1 base URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TINY_SERVER_KEY", None)
    if kind == "stub":
        cmd = [sys.executable, __file__, "--serve-stub", "--latency-ms", str(latency_ms)]
    elif kind == "tiny":
        cmd = [sys.executable, str(TEST_SERVER), "serve-tiny-model", str(workdir / "model")]
    else:  # transformers serve
        subprocess.run([sys.executable, str(TEST_SERVER), "make-tiny-model",
                        str(workdir / "model")], check=True, env=env)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(["transformers", "serve", str(workdir / "model"), "--host",
                                 "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, 180)
        return proc, f"http://127.0.0.1:{port}/v1"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    port = _read_port(proc, 180)
    _wait_healthy(f"http://127.0.0.1:{port}/health", proc, 60)
    return proc, f"http://127.0.0.1:{port}/v1"


def make_items(n: int, words: int) -> list[PairwiseItem]:
    """n distinct pairs whose outputs are about `words` words long."""
    return [PairwiseItem(instruction=f"Describe item {i} briefly.",
                         output_1=Candidate(" ".join(f"quick{i}" for _ in range(words))),
                         output_2=Candidate(" ".join(f"lazy{i}" for _ in range(words))))
            for i in range(n)]


def measure(base_url: str, model: str, in_flight: int, n: int, words: int, mode: str,
            parser: str) -> tuple[float, float]:
    """Judge n fresh items with `in_flight` requests at once; (judgments/s, seconds)."""
    from harness.judging import llm as llm_judge

    judge = llm_judge.build(JudgeSpec(name="bench", kind="openai", params={
        "model": model, "base_url": base_url, "api_key_env": "", "mode": mode,
        "template": "templates/pairwise.txt", "identifiers": ["A", "B"], "parser": parser,
        "max_concurrency": in_flight, "timeout_s": 300, "max_retries": 0}))
    judge.judge_one(make_items(1, words)[0])  # warm: client, connection, imports
    items = make_items(n, words)
    t0 = time.perf_counter()
    got = sum(1 for _ in judge.judge(items))
    dt = time.perf_counter() - t0
    assert got == n
    return n / dt, dt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per concurrency level."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", choices=["stub", "tiny", "transformers"], default="stub")
    ap.add_argument("--base-url", help="use this running server instead of starting one")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="stub server delay")
    ap.add_argument("--levels", default="1,8,32", help="requests in flight, comma-separated")
    ap.add_argument("--seconds", type=float, default=4.0, help="rough time per level")
    ap.add_argument("--words", type=int, default=150, help="words per output")
    ap.add_argument("--mode", default="alpaca_eval", choices=["alpaca_eval", "both_orders"])
    ap.add_argument("--serve-stub", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_stub:
        serve_stub(args.latency_ms / 1000)
        return 0

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        try:
            if args.base_url:
                base_url, what = args.base_url, args.base_url
            else:
                proc, base_url = start_server(args.server, args.latency_ms, Path(tmp))
                what = (f"stub server, {args.latency_ms:g} ms/request" if args.server == "stub"
                        else f"{args.server} server, tiny random Llama on CPU")
            parser = "text" if args.server == "transformers" else "logprobs"
            model = str(Path(tmp) / "model") if args.server == "transformers" else args.model
            print(f"# {what}; {os.cpu_count()} CPUs; mode={args.mode}; outputs ~{args.words} "
                  f"words; python {sys.version.split()[0]}")
            for level in levels:  # a short probe sizes each level to about args.seconds
                probe, _ = measure(base_url, model, level, 2 * level, args.words, args.mode,
                                   parser)
                n = max(level * 4, min(4000, int(probe * args.seconds)))
                rate, dt = measure(base_url, model, level, n, args.words, args.mode, parser)
                print(f"in_flight={level:>3}  judgments={n:>5}  seconds={dt:7.2f}  "
                      f"judgments/s={rate:8.1f}", flush=True)
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

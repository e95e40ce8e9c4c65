"""A small OpenAI-compatible server of a tiny random model, shared by the judge and backend tests.

Run as a script it serves a model folder (made here if empty) on 127.0.0.1 and prints
`PORT <n>` once listening:

    python tests/tiny_server.py serve-tiny-model DIR   # greedy chat + completions, real logprobs
    python tests/tiny_server.py serve-fixed TEXT       # answers at once with TEXT (overhead)
    python tests/tiny_server.py make-tiny-model DIR    # the judge tests' model, saved to DIR

/v1/chat/completions applies the tokenizer's chat template; /v1/completions tokenizes the prompt
(with the tokenizer's special tokens unless the body says "add_special_tokens": false). Both
decode greedily up to max_tokens (default 16), stop on EOS with finish_reason "stop" (else
"length"), and report usage as vLLM does (completion_tokens counts the EOS token). With
$TINY_SERVER_KEY set, any other bearer key gets 401. `transformers serve` ignores
`logprobs`/`top_logprobs`, which is why this server exists.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    """Poll url until it answers 200, the process exits, or deadline_s passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server not healthy within {deadline_s}s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process (kill it after 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(args: list[str], env: dict[str, str] | None = None,
          deadline_s: float = 120) -> tuple[subprocess.Popen, str]:
    """Start this file as a server (`serve-tiny-model DIR` or `serve-fixed TEXT`); return the
    process and its /v1 base URL once /health answers."""
    root = str(HERE.parent)
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            env=full)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout],
                         daemon=True).start()
        try:
            line = lines.get(timeout=deadline_s)
        except queue.Empty:
            raise RuntimeError(f"server did not start within {deadline_s} s") from None
        if not line.startswith("PORT "):
            raise RuntimeError(f"server said {line!r}")
        base = f"http://127.0.0.1:{int(line.split()[1])}"
        wait_healthy(base + "/health", proc, 30)
    except BaseException:
        stop(proc)
        raise
    return proc, base + "/v1"


def make_tiny_model(model_dir: Path) -> None:
    """Save a tiny random Llama with a byte-level BPE tokenizer (no hub). Its weights are random
    except that the labels "A" and "B" are made likely, so both show up among the top 5."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=16384, bos_token_id=0, eos_token_id=1,
                      pad_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a constant direction in the residual stream that only A/B read
        model.model.embed_tokens.weight[:, 0] = 20.0
        model.lm_head.weight[:, 0] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        for label in ("A", "B"):
            row = model.lm_head.weight[tok.convert_tokens_to_ids(label)]
            row.normal_(0, 1)
            row[0] = 3.0
    tok.save_pretrained(model_dir)
    model.save_pretrained(model_dir)


def _serve(handle_post) -> None:
    """Serve POST bodies through handle_post(path, headers, body) -> (status, obj), GET /health
    and /v1/models; print the port and serve forever."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers
        disable_nagle_algorithm = True

        def send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                return self.send(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self.send(200, {"object": "list", "data": [{"id": "tiny"}]})
            self.send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self.send(*handle_post(self.path, self.headers, body))

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # listen backlog: the default 5 resets bursts of connects
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


def _unauthorised(headers) -> tuple[int, dict] | None:
    key = os.environ.get("TINY_SERVER_KEY", "")
    if key and headers.get("authorization") != f"Bearer {key}":
        return 401, {"error": {"message": "Incorrect API key provided: "
                               + headers.get("authorization", "")}}
    return None


def _reply(body: dict, kind: str, text: str, finish: str, n_prompt: int, n_out: int,
           logprobs: list | None = None) -> dict:
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
             "total_tokens": n_prompt + n_out}
    if kind == "chat":
        choice = {"index": 0, "finish_reason": finish,
                  "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": logprobs} if logprobs is not None else None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "finish_reason": finish, "text": text, "logprobs": None}
        obj = "text_completion"
    return {"id": "tiny", "object": obj, "created": int(time.time()),
            "model": body.get("model", "tiny"), "choices": [choice], "usage": usage}


ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def serve_tiny_model(model_dir: Path) -> None:
    """Serve chat and text completions of a model folder (greedy, KV cache, real logprobs)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lock = threading.Lock()

    def complete(body: dict, kind: str) -> dict:
        if kind == "chat":
            enc = tok.apply_chat_template(body["messages"], add_generation_prompt=True,
                                          return_tensors="pt")
            ids = enc if torch.is_tensor(enc) else enc["input_ids"]
        else:
            special = body.get("add_special_tokens", True)
            ids = torch.tensor([tok(body["prompt"], add_special_tokens=special)["input_ids"]])
        n_prompt, content, out, finish = ids.shape[1], [], [], "length"
        past = None
        for _ in range(int(body.get("max_tokens") or 16)):
            with lock, torch.no_grad():
                res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logp = torch.log_softmax(res.logits[0, -1].float(), -1)
            tid = int(logp.argmax())
            top = torch.topk(logp, int(body.get("top_logprobs") or 1))

            def entry(i, lp):
                t = tok.decode([int(i)])
                return {"token": t, "logprob": float(lp), "bytes": list(t.encode())}

            content.append({**entry(tid, logp[tid]), "top_logprobs": [
                entry(i, v) for v, i in zip(top.values, top.indices, strict=True)]})
            out.append(tid)
            ids = torch.tensor([[tid]])
            if tid == tok.eos_token_id:
                finish = "stop"
                break
        text = tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=True)
        return _reply(body, kind, text, finish, n_prompt, len(out),
                      content if body.get("logprobs") else None)

    def handle(path, headers, body):
        if path not in ROUTES:
            return 404, {"error": {"message": f"no route {path}"}}
        return _unauthorised(headers) or (200, complete(body, ROUTES[path]))

    _serve(handle)


def serve_fixed(text: str) -> None:
    """Answer every completion at once with the same text (the harness's own overhead)."""
    def handle(path, headers, body):
        if path not in ROUTES:
            return 404, {"error": {"message": f"no route {path}"}}
        n = len(text.split())
        return _unauthorised(headers) or (200, _reply(body, ROUTES[path], text, "stop", 20, n))

    _serve(handle)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-tiny-model"]:
        serve_tiny_model(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["serve-fixed"]:
        serve_fixed(sys.argv[2])
    elif sys.argv[1:2] == ["make-tiny-model"]:
        make_tiny_model(Path(sys.argv[2]))
    else:
        sys.exit("usage: tiny_server.py serve-tiny-model DIR | serve-fixed TEXT | "
                 "make-tiny-model DIR")

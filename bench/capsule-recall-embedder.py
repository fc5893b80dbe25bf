#!/usr/bin/env python3
"""The embedding provider of bench/capsule-recall: an OpenAI-compatible POST /v1/embeddings on
127.0.0.1 serving one real model, WordLlama's l2_supercat at 256 dimensions, from the files its
PyPI wheel ships (wordllama==0.4.0.post1, MIT; installed by scripts/test-deps/wordllama.sh).

The model is a static token-embedding table (32,000 Llama-2 tokens x 256, float16) trained by
WordLlama's author on sentence pairs for similarity; a text's embedding is the mean of its
tokens' rows (WordLlamaInference.embed, average pooling), L2-normalised. The benchmark packs the
Capsule's chunk embeddings through this endpoint and the sidecar embeds each query through it
(its metered provider call), so chunks and queries are embedded by the same function. Each
text is embedded alone, so a text's vector does not depend on what it was batched with.

Usage: capsule-recall-embedder.py KEY   prints "port N" once listening; answers until killed.
Requests must carry "Authorization: Bearer KEY" (the sidecar sends its provider key).
"""

import json
import pathlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import wordllama
from safetensors import safe_open
from tokenizers import Tokenizer
from wordllama.inference import WordLlamaInference

MODEL = "wordllama-l2-supercat-256"
KEY = sys.argv[1]

# Loaded from the package's own files: WordLlama.load() looks for the tokenizer in a folder the
# wheel does not have and would then try to download it.
root = pathlib.Path(wordllama.__file__).parent
with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np") as f:
    table = f.get_tensor("embedding.weight")
tokenizer = Tokenizer.from_file(str(root / "tokenizers" / "l2_supercat_tokenizer_config.json"))
model = WordLlamaInference(table, tokenizer)


def embed(text):
    vector = model.embed([text], norm=True)[0]
    tokens = len(tokenizer.encode(text, add_special_tokens=False).ids)
    return [float(x) for x in np.asarray(vector, dtype=np.float32)], tokens


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm holds the
    # body until the client's delayed ACK (~40 ms per call on a kept-alive connection).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message):
        self.answer(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/embeddings":
            return self.error(404, f"no route {self.path}")
        if self.headers.get("authorization") != f"Bearer {KEY}":
            return self.error(401, "bad key")
        try:
            req = json.loads(raw)
        except ValueError as e:
            return self.error(400, f"not JSON: {e}")
        if req.get("model") != MODEL:
            return self.error(404, f"model {req.get('model')!r} is not served; only {MODEL}")
        texts = req.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self.error(400, "input must be a string or a list of strings")
        data, total = [], 0
        for i, t in enumerate(texts):
            vector, tokens = embed(t)
            total += tokens
            data.append({"object": "embedding", "index": i, "embedding": vector})
        self.answer(200, {
            "object": "list",
            "data": data,
            "model": MODEL,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        })


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"port {server.server_address[1]}", flush=True)
server.serve_forever()

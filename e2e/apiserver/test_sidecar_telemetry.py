"""The metering sidecar exports one GenAI span per call over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.

    client ──► soma-proxy ──► soma-fake-upstream (deterministic OpenAI stand-in)
                   └──OTLP/HTTP protobuf──▶ oteltap receiver ──re-emit──▶ resource recorder

Chat calls go through the real binaries: to an OpenAI-kind sidecar one plain, one streamed,
one the provider answers with a 500 and one the Budget refuses; to an Anthropic-kind sidecar
one streamed. The test awaits their spans and checks the names, kind and attributes the
OpenTelemetry GenAI semantic conventions ask for, Soma's own `soma.*` attributes, the resource
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), and that neither the provider key, the
client token nor any prompt or answer text is in any exported attribute. Bounded: 60 s a wait.
Needs SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN; skipped without.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import pathlib
import subprocess
import threading
from typing import Any

import pytest
import requests

from harness import free_port, stop_process

PROXY = os.environ.get("SOMA_PROXY_BIN", "")
UPSTREAM = os.environ.get("SOMA_FAKE_UPSTREAM_BIN", "")
pytestmark = pytest.mark.skipif(
    not all(b and os.access(b, os.X_OK) for b in (PROXY, UPSTREAM)),
    reason="SOMA_PROXY_BIN and SOMA_FAKE_UPSTREAM_BIN are not both set to executables")

KEY = "sk-e2e-SECRET-51f0c9a7d3"
TOKEN = "pod-uid-e2e-8b21"
PROMPT = "zebra-quartz-prompt-text"
CLIENT = 3  # Span.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR


def value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kv_list) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kv_list}


class ResourceRecorder:
    """Receives what oteltap re-emits (whole OTLP requests) and keeps each span's resource."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.resources: list[dict[str, Any]] = []
        self.spans: list[tuple[str, dict[str, Any]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    recorder.resources.append(attributes(rs.resource.attributes))
                    for ss in rs.scope_spans:
                        recorder.spans.extend((s.name, attributes(s.attributes)) for s in ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_upstream(tmp_path: pathlib.Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([UPSTREAM, "--listen", "127.0.0.1:0", "--key", KEY],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "upstream.log", "wb"))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), f"soma-fake-upstream printed {line!r}"
    return proc, "http://" + line.removeprefix("listening on ").strip()


def start_proxy(tmp_path: pathlib.Path, upstream: str, otlp: str,
                kind: str = "openai") -> tuple[subprocess.Popen[bytes], str, list[str]]:
    tmp_path = tmp_path / kind
    tmp_path.mkdir()
    (tmp_path / "api-key").write_text(KEY + "\n")
    config = {
        "listen": "127.0.0.1:0",
        "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "research", "name": "assistant"},
        "provider": {"kind": kind, "upstream": upstream, "model": "gpt-4o-mini"},
        "credentials": {"file": str(tmp_path / "api-key")},
        "clientTokenEnv": "SOMA_POD_UID",
        "outboxPath": str(tmp_path / "outbox.db"),
        "prices": {"gpt-4o-mini": {"inputPerMTok": 150_000, "outputPerMTok": 600_000},
                   "claude-sonnet-4": {"inputPerMTok": 3_000_000, "outputPerMTok": 15_000_000}},
        "budget": "team",
        "budgets": [{"name": "team", "limits": {"costMicros": 1_000_000}, "period": {"calendar": "day"}}],
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(SOMA_POD_UID=TOKEN, RUST_LOG="info", OTEL_EXPORTER_OTLP_ENDPOINT=otlp,
               OTEL_SERVICE_NAME="soma-proxy-e2e",
               OTEL_RESOURCE_ATTRIBUTES="k8s.namespace.name=research,soma.agent=assistant")
    proc = subprocess.Popen([PROXY, "--config", str(tmp_path / "config.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        lines.append(line)
        if "soma-proxy serving" in line:
            addr = json.loads(line)["fields"]["proxy_addr"]
            # Keep draining so the sidecar never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(r.decode(errors="replace") for r in proc.stdout),
                             daemon=True).start()
            return proc, f"http://{addr}", lines
    raise AssertionError("soma-proxy exited before serving:\n" + "".join(lines))


def chat(proxy: str, content: str, **extra: Any) -> requests.Response:
    body = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": content}], **extra}
    return requests.post(f"{proxy}/v1/chat/completions", json=body, timeout=30,
                         headers={"authorization": f"Bearer {TOKEN}"}, stream=bool(extra.get("stream")))


def messages(proxy: str, content: str, **extra: Any) -> requests.Response:
    body = {"model": "claude-sonnet-4", "max_tokens": 16, "messages": [{"role": "user", "content": content}], **extra}
    return requests.post(f"{proxy}/v1/messages", json=body, timeout=30, headers={"x-api-key": TOKEN},
                         stream=bool(extra.get("stream")))


def test_genai_spans_reach_an_otlp_receiver(tmp_path: pathlib.Path) -> None:
    from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

    recorder = ResourceRecorder()
    upstream = proxy = anthropic = None
    port = free_port()

    async def scenario() -> None:
        nonlocal upstream, proxy, anthropic
        settings = OtelTapHttpProtobufReceiverSettings(http_port=port, listen_on_all_interfaces=False,
                                                       reemit_traces_to_url=recorder.url)
        async with OtelTapHttpProtobufReceiver(settings) as receiver:
            # Every span the receiver hands over is kept: its await_trace sees only spans that
            # arrive while it waits, and the batch exporter sends several spans at once.
            seen: list[Any] = []

            async def collect() -> None:
                async for received in receiver.stream_traces():
                    seen.append(received)

            collector = asyncio.create_task(collect())
            await asyncio.sleep(0.1)  # the subscription starts with the task's first step

            async def find(predicate, what: str):
                for _ in range(600):  # 60 s at most
                    found = next((s for s in seen if predicate(s)), None)
                    if found is not None:
                        return found
                    await asyncio.sleep(0.1)
                raise AssertionError(f"no span for {what}; received {[s.name for s in seen]}")

            upstream, upstream_url = start_upstream(tmp_path)
            proxy, proxy_url, log = start_proxy(tmp_path, upstream_url, f"http://127.0.0.1:{port}")

            plain = await asyncio.to_thread(chat, proxy_url, PROMPT)
            assert plain.status_code == 200, plain.text
            # `slow`: the fake upstream waits 20 ms between its 18 chunks, so the stream outlasts
            # the response headers by at least 17 × 20 ms.
            streamed = await asyncio.to_thread(chat, proxy_url, "SCENARIO:slow " + PROMPT, stream=True,
                                               stream_options={"include_usage": True})
            assert streamed.status_code == 200
            stream_text = await asyncio.to_thread(lambda: streamed.content.decode())
            assert "data: [DONE]" in stream_text
            failed = await asyncio.to_thread(chat, proxy_url, "SCENARIO:error-500")
            assert failed.status_code == 500
            # Worst case 5M output tokens × 0.6 micro-units each is over the 1M cap: refused.
            refused = await asyncio.to_thread(chat, proxy_url, PROMPT, max_tokens=5_000_000)
            assert refused.status_code == 429, refused.text

            anthropic, anthropic_url, anthropic_log = start_proxy(tmp_path, upstream_url,
                                                                  f"http://127.0.0.1:{port}", kind="anthropic")
            claude = await asyncio.to_thread(messages, anthropic_url, PROMPT, stream=True)
            assert claude.status_code == 200
            claude_text = await asyncio.to_thread(lambda: claude.content.decode())
            assert "message_stop" in claude_text

            def call(stream: bool, status: int):
                def match(span) -> bool:
                    a = attributes(span.attributes)
                    return (span.name == "chat gpt-4o-mini" and a.get("gen_ai.request.stream") is stream
                            and a.get("http.response.status_code") == status)
                return find(match, f"stream={stream} status={status}")

            def named(name: str, error_type: str | None = None):
                def match(span) -> bool:
                    return span.name == name and attributes(span.attributes).get("error.type") == error_type
                return find(match, f"{name} error.type={error_type}")

            spans = {"plain": await call(False, 200), "streamed": await call(True, 200),
                     "failed": await call(False, 500), "refused": await named("chat gpt-4o-mini", "budget"),
                     "claude": await named("chat claude-sonnet-4")}
            collector.cancel()
            stop_process(proxy)  # flushes the batch exporter
            stop_process(anthropic)
            await asyncio.sleep(0.5)  # oteltap re-emits asynchronously

        usages = {"plain": plain.json()["usage"],
                  "streamed": [json.loads(e.removeprefix("data: ")) for e in stream_text.split("\n\n")
                               if e.startswith("data: {") and '"usage":{' in e][-1]["usage"]}
        for name, span in spans.items():
            if name == "claude":
                continue
            a = attributes(span.attributes)
            assert span.kind == CLIENT, name
            assert span.end_time_unix_nano >= span.start_time_unix_nano > 0, name
            expected = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.system": "openai",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.request.max_tokens": 16,
                "server.address": "127.0.0.1",
                "server.port": int(upstream_url.rsplit(":", 1)[1]),
                "soma.budget": "research/team",
            }
            if name == "refused":
                expected["gen_ai.request.max_tokens"] = 5_000_000
            assert {k: a.get(k) for k in expected} == expected, (name, a)
            if name != "refused":  # refused before anything was settled
                assert isinstance(a.get("soma.usage.estimated"), bool), (name, a)
        for name in ("plain", "streamed"):
            a = attributes(spans[name].attributes)
            assert a["gen_ai.response.id"] == "chatcmpl-fake", (name, a)
            assert a["gen_ai.response.model"] == "gpt-4o-mini", (name, a)
            assert a["gen_ai.response.finish_reasons"] == ["stop"], (name, a)
            assert a["gen_ai.usage.input_tokens"] == usages[name]["prompt_tokens"], (name, a)
            assert a["gen_ai.usage.output_tokens"] == usages[name]["completion_tokens"], (name, a)
            assert a["soma.usage.estimated"] is False, (name, a)
            assert a["soma.cost_micros"] > 0, (name, a)
            assert a["soma.outcome"] == "ok", (name, a)
            assert "error.type" not in a, (name, a)
        a = attributes(spans["failed"].attributes)
        assert a["error.type"] == "500", a
        assert a["soma.outcome"] == "upstream_error", a
        assert spans["failed"].status.code == STATUS_ERROR, spans["failed"].status
        a = attributes(spans["refused"].attributes)
        assert a["soma.budget.refused_by"] == "research/team", a
        assert a["http.response.status_code"] == 429, a
        assert "gen_ai.usage.input_tokens" not in a, a
        assert spans["refused"].status.code == STATUS_ERROR

        a = attributes(spans["claude"].attributes)
        assert spans["claude"].kind == CLIENT
        claude_events = [json.loads(line.removeprefix("data: ")) for line in claude_text.splitlines()
                         if line.startswith("data: {")]
        start = next(e for e in claude_events if e["type"] == "message_start")["message"]
        delta = next(e for e in claude_events if e["type"] == "message_delta")
        want = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-sonnet-4",
            "gen_ai.request.stream": True,
            "gen_ai.response.id": start["id"],
            "gen_ai.response.model": start["model"],
            "gen_ai.response.finish_reasons": [delta["delta"]["stop_reason"]],
            "gen_ai.usage.input_tokens": start["usage"]["input_tokens"],
            "gen_ai.usage.output_tokens": delta["usage"]["output_tokens"],
            "soma.usage.estimated": False,
            "soma.outcome": "ok",
        }
        assert {k: a.get(k) for k in want} == want, a
        # The streamed span ends after the stream was metered (its usage is on it, above), not when
        # the response headers went out: it lasts at least the upstream's 17 pauses of 20 ms.
        streamed_ns = spans["streamed"].end_time_unix_nano - spans["streamed"].start_time_unix_nano
        assert streamed_ns >= 17 * 20_000_000, streamed_ns

        assert recorder.resources, "oteltap re-emitted nothing"
        for resource in recorder.resources:
            assert resource.get("service.name") == "soma-proxy-e2e", resource
            assert resource.get("k8s.namespace.name") == "research", resource
            assert resource.get("soma.agent") == "assistant", resource
        # Nothing secret or private in any exported attribute, of any span.
        assert recorder.spans
        for name, attrs in recorder.spans:
            text = json.dumps(attrs)
            for secret in (KEY, TOKEN, PROMPT, "w0 w1"):
                assert secret not in text, f"{secret!r} in span {name}: {text}"
        assert not any(KEY in line for line in log + anthropic_log)

    try:
        asyncio.run(scenario())
    finally:
        stop_process(proxy)
        stop_process(anthropic)
        stop_process(upstream)
        recorder.stop()

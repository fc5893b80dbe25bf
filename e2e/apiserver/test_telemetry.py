"""The operator exports its reconcile spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.

    soma-operator run ──OTLP/HTTP protobuf──▶ oteltap receiver (127.0.0.1, random port)

One Agent is applied to the API stand-in; the test awaits a `reconcile` span carrying the
Agent's name and namespace. Bounded: 60 s at most.
Needs SOMA_OPERATOR_BIN; skipped without.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess

import pytest

from harness import REPO, StandIn, free_port, stop_process

BIN = os.environ.get("SOMA_OPERATOR_BIN", "")
pytestmark = pytest.mark.skipif(not BIN or not os.access(BIN, os.X_OK),
                                reason="SOMA_OPERATOR_BIN is not set to an executable soma-operator")

NAMESPACE = "otel"


def attributes(kv_list) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in kv_list}


def test_reconcile_spans_reach_an_otlp_receiver(tmp_path: pathlib.Path) -> None:
    from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

    standin = StandIn(tmp_path / "apiserver", crds=REPO / "crds")
    operator = None
    port = free_port()

    async def scenario() -> None:
        nonlocal operator
        settings = OtelTapHttpProtobufReceiverSettings(http_port=port, listen_on_all_interfaces=False)
        async with OtelTapHttpProtobufReceiver(settings) as receiver:
            kubeconfig = standin.write_kubeconfig(tmp_path / "kubeconfig")
            standin.kube.ensure_namespace(NAMESPACE)
            standin.kube.apply({"apiVersion": "soma.dev/v1alpha1", "kind": "Agent",
                                "metadata": {"name": "traced", "namespace": NAMESPACE},
                                "spec": {"image": "registry.example.com/a@sha256:" + "0" * 64,
                                         "model": {"provider": "openai", "name": "gpt-4o-mini"}}})
            env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "OTEL_"))}
            env.update(KUBECONFIG=str(kubeconfig), OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
                       RUST_LOG="info")
            log = open(tmp_path / "operator.log", "wb")
            operator = subprocess.Popen([BIN, "run", "--no-leader-election", "--metrics-addr",
                                         f"127.0.0.1:{free_port()}"], env=env, stdout=log, stderr=subprocess.STDOUT)

            def is_reconcile(span) -> bool:
                a = attributes(span.attributes)
                return span.name == "reconcile" and a.get("agent") == "traced" and a.get("namespace") == NAMESPACE

            span = await receiver.await_trace(is_reconcile, timeout=60)
            assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
            # Spans are batched: stop the operator so it flushes, then stop the receiver.
            stop_process(operator)

    try:
        asyncio.run(scenario())
    finally:
        stop_process(operator)
        standin.stop()

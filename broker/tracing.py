"""OpenTelemetry tracing, off unless the ``tracing:`` settings turn it on.

When off, the broker uses `SilentTracer`: a span is one shared object whose methods do nothing
(cheaper than the OpenTelemetry API's no-op tracer, which still attaches and detaches a context
per span: measurable on the credential fetch path), and nothing is exported. When on, a
`TracerProvider` of its own (never the process-wide global one, so several apps in one process do
not share exporters) batches spans to an OTLP/HTTP collector (``exporter: otlp``) or prints them
(``exporter: console``).

Spans: one server span per request (``POST /oauth2/token``, ...) named by the route *template*,
continuing the caller's W3C ``traceparent`` when one is sent, and child spans for the steps of the
two hot paths. Attributes are fixed codes, route templates, client ids, credential names and the
request id; never tokens, secrets or person identifiers (the audit record joins a trace to the
person through the request id).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from broker.settings import TracingConfig

__all__ = [
    "SilentTracer",
    "SpanKind",
    "Status",
    "StatusCode",
    "Tracing",
    "build_tracing",
    "incoming_context",
]


class _SilentSpan:
    """A span that records nothing; its own context manager (`with` yields itself)."""

    __slots__ = ()

    def __enter__(self) -> _SilentSpan:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def set_attribute(self, key: str, value: object) -> None:
        return None

    def set_status(self, status: object, description: str | None = None) -> None:
        return None


_SILENT_SPAN = _SilentSpan()


class SilentTracer:
    """The tracer when tracing is off: `start_as_current_span` returns one shared no-op span."""

    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> _SilentSpan:
        return _SILENT_SPAN


@dataclass
class Tracing:
    """The tracer the broker's code uses, and what must be flushed at shutdown."""

    tracer: Tracer | SilentTracer
    provider: Any = None  # opentelemetry.sdk.trace.TracerProvider when enabled

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        """Export what is buffered and stop (called when the app stops)."""
        if self.provider is not None:
            self.provider.shutdown()


def disabled() -> Tracing:
    return Tracing(SilentTracer())


def build_tracing(config: TracingConfig, *, span_exporter: Any = None) -> Tracing:
    """A `Tracing` for the settings; `span_exporter` replaces the configured exporter (tests)."""
    if not config.enabled:
        return disabled()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": config.service_name, "service.namespace": "agent-identity-broker"}
        ),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif config.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(
                    endpoint=config.endpoint,
                    certificate_file=str(config.ca_file) if config.ca_file else None,
                    timeout=config.timeout_seconds,
                ),
                schedule_delay_millis=int(config.export_interval_seconds * 1000),
            )
        )
    return Tracing(provider.get_tracer("broker"), provider)


def incoming_context(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context from W3C ``traceparent``/``tracestate`` headers, if any."""
    if "traceparent" not in headers:
        return None
    return extract({"traceparent": headers["traceparent"], **_tracestate(headers)})


def _tracestate(headers: Mapping[str, str]) -> dict[str, str]:
    state = headers.get("tracestate")
    return {"tracestate": state} if state else {}

//! Logs and traces for the daemons: `tracing` events to stderr (filtered by `BERTH_LOG` or
//! `--log`), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/gRPC to
//! a collector (the OpenTelemetry SDK reads the standard `OTEL_*` variables).
//!
//! Trace context crosses gRPC calls as a W3C `traceparent` (and `tracestate`) metadata entry:
//! [`inject_trace_context`] adds the current span's on the calling side (a tonic interceptor),
//! [`grpc_server_span`] makes the served request's span a child of it (tonic's `trace_fn`).
//! Both do nothing unless spans are exported.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// True once [`init`] has installed an OTLP exporter.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (so trace context is worth carrying).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber. Call it inside a tokio runtime (`Runtime::enter`), once.
/// An exporter that cannot be built is reported on stderr and the daemon runs without it.
pub fn init(service: &'static str, filter: &str) -> Telemetry {
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let env_filter = tracing_subscriber::EnvFilter::new(filter);
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(
                            opentelemetry_sdk::Resource::builder()
                                .with_service_name(service)
                                .build(),
                        )
                        .build(),
                ),
                Err(e) => {
                    eprintln!("{service}: traces will not be exported to {endpoint}: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(env_filter)
        .with(fmt)
        .with(otel)
        .init();
    Telemetry { provider }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Writes W3C trace context into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Reads W3C trace context from HTTP/2 headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Adds the current span's trace context (`traceparent`, `tracestate`) to `metadata`.
/// Does nothing unless spans are exported, or outside any exported span.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    if !exporting() {
        return;
    }
    inject(&tracing::Span::current().context(), metadata);
}

fn inject(cx: &opentelemetry::Context, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// A tonic interceptor for clients: [`inject_current`] on every request. Never fails.
pub fn inject_trace_context(
    mut req: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_current(req.metadata_mut());
    Ok(req)
}

/// The trace context a request carries (empty when it carries none or a malformed one).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// For tonic's `Server::trace_fn`: a `grpc` span named after the called method, whose parent
/// is the caller's span when the request carries trace context and spans are exported.
/// The handlers' own spans (with their `instance`, `op` ids) nest inside it.
pub fn grpc_server_span(req: &http::Request<()>) -> tracing::Span {
    server_span(req, exporting())
}

fn server_span(req: &http::Request<()>, link: bool) -> tracing::Span {
    let span = tracing::info_span!("grpc", method = %req.uri().path());
    if link {
        use opentelemetry::trace::TraceContextExt as _;
        let cx = extract(req.headers());
        if cx.span().span_context().is_valid() {
            // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
            let _ = span.set_parent(cx);
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    #[test]
    fn trace_context_round_trips_through_metadata() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let mut md = tonic::metadata::MetadataMap::new();
        inject(&cx, &mut md);
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let headers = md.into_headers();
        let back = extract(&headers);
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
        // Nothing, or garbage, gives no parent.
        let mut bad = http::HeaderMap::new();
        bad.insert("traceparent", http::HeaderValue::from_static("00-zz-yy-01"));
        assert!(!extract(&bad).span().span_context().is_valid());
        assert!(
            !extract(&http::HeaderMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }

    #[test]
    fn spans_carry_their_trace_to_the_server_span() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("caller");
            let entered = caller.enter();
            let mut md = tonic::metadata::MetadataMap::new();
            inject(&tracing::Span::current().context(), &mut md);
            let trace_id = caller.context().span().span_context().trace_id();
            let tp = md.get("traceparent").unwrap().to_str().unwrap().to_string();
            assert!(tp.contains(&trace_id.to_string()), "{tp}");
            // On the serving side the request's span joins the caller's trace.
            let mut req = http::Request::new(());
            *req.headers_mut() = md.into_headers();
            let served = server_span(&req, true);
            assert_eq!(served.context().span().span_context().trace_id(), trace_id);
            drop(entered);
            // Without the flag (and outside the caller) the server span starts its own trace.
            let alone = server_span(&req, false);
            assert_ne!(alone.context().span().span_context().trace_id(), trace_id);
        });
    }

    #[test]
    fn nothing_is_injected_without_an_exporter() {
        let mut req = tonic::Request::new(());
        req = inject_trace_context(req).unwrap();
        assert!(req.metadata().get("traceparent").is_none());
        let span = grpc_server_span(&http::Request::new(()));
        drop(span);
    }
}

//! Logs and traces for the daemons: `tracing` events to stderr (filtered by `BERTH_LOG` or
//! `--log`), and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/gRPC to
//! a collector (the OpenTelemetry SDK reads the standard `OTEL_*` variables).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

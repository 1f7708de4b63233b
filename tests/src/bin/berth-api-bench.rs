//! API write benchmark: many concurrent clients, each on its own keep-alive HTTPS connection to
//! one of the given controllers (round robin, so followers forward to the leader), create and
//! delete image aliases (one Raft write each) for a fixed time, then print throughput and
//! latency percentiles.
//!
//! ```text
//! berth-api-bench --urls https://10.99.0.11:8443,https://10.99.0.12:8443 \
//!     --key-file admin.key --ca-file cluster.crt --clients 32 --seconds 20 --image busybox
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
#[command(
    name = "berth-api-bench",
    about = "Measure API write throughput and latency"
)]
struct Args {
    /// Controller API URLs, comma separated (https://HOST:PORT).
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    /// File holding an API key.
    #[arg(long)]
    key_file: PathBuf,
    /// The cluster CA certificate (PEM).
    #[arg(long)]
    ca_file: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// An existing image (alias or fingerprint) that the aliases point at.
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Also write the figures as JSON to this file (what `berth-bench --cluster` reads).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One keep-alive connection to a controller.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
    key: String,
}

impl Conn {
    async fn open(url: &str, key: &str, tls: &TlsConnector) -> Result<Conn> {
        let authority = url
            .strip_prefix("https://")
            .with_context(|| format!("{url} is not an https:// URL"))?
            .trim_end_matches('/')
            .to_string();
        let tcp = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(berth_proto::CONTROLLER_TLS_NAME.to_string())?;
        let stream = tls.connect(name, tcp).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            authority,
            key: key.to_string(),
        })
    }

    /// Sends one request; returns the status code.
    async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<u16> {
        self.sender.ready().await?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: std::collections::BTreeMap<String, u64>,
}

async fn client(
    id: usize,
    url: String,
    key: String,
    tls: TlsConnector,
    image: String,
    until: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn = None;
    let mut n = 0u64;
    while Instant::now() < until {
        if conn.is_none() {
            match Conn::open(&url, &key, &tls).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    *tally.errors.entry(format!("connect: {e}")).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let name = format!("bench-{id}-{n}");
        n += 1;
        let create = serde_json::json!({ "name": name, "target": image }).to_string();
        for (method, path, body) in [
            (
                http::Method::POST,
                "/1.0/images/aliases".to_string(),
                Some(create),
            ),
            (
                http::Method::DELETE,
                format!("/1.0/images/aliases/{name}"),
                None,
            ),
        ] {
            let started = Instant::now();
            match c.send(method, &path, body).await {
                Ok(s) if (200..300).contains(&s) => tally.latencies.push(started.elapsed()),
                Ok(s) => *tally.errors.entry(format!("HTTP {s}")).or_default() += 1,
                Err(e) => {
                    *tally.errors.entry(format!("request: {e}")).or_default() += 1;
                    conn = None;
                    break;
                }
            }
        }
    }
    tally
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.clients == 0 || args.seconds == 0 {
        bail!("--clients and --seconds must be at least 1");
    }
    let key = std::fs::read_to_string(&args.key_file)
        .with_context(|| format!("cannot read {}", args.key_file.display()))?
        .trim()
        .to_string();
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca_file)
        .with_context(|| format!("cannot read {}", args.ca_file.display()))?
    {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = berth_proto::tls::ControllerVerifier::with_roots(roots, provider)?;
    let config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let tls = TlsConnector::from(Arc::new(config));

    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            tokio::spawn(client(
                i,
                args.urls[i % args.urls.len()].clone(),
                key.clone(),
                tls.clone(),
                args.image.clone(),
                until,
            ))
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await?;
        all.latencies.extend(t.latencies);
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "controllers: {}  clients: {}  duration: {:.1} s",
        args.urls.len(),
        args.clients,
        elapsed
    );
    println!(
        "writes acknowledged: {}  throughput: {:.0} writes/s",
        all.latencies.len(),
        all.latencies.len() as f64 / elapsed
    );
    println!(
        "latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        ms(percentile(&all.latencies, 0.50)),
        ms(percentile(&all.latencies, 0.90)),
        ms(percentile(&all.latencies, 0.99)),
        ms(percentile(&all.latencies, 1.0)),
    );
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "controllers": args.urls.len(),
            "clients": args.clients,
            "seconds": elapsed,
            "writes": all.latencies.len(),
            "writes_per_s": all.latencies.len() as f64 / elapsed,
            "latency_ms": {
                "p50": ms(percentile(&all.latencies, 0.50)),
                "p90": ms(percentile(&all.latencies, 0.90)),
                "p99": ms(percentile(&all.latencies, 0.99)),
                "max": ms(percentile(&all.latencies, 1.0)),
            },
            "errors": all.errors,
            "errors_total": all.errors.values().sum::<u64>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if all.errors.is_empty() {
        println!("errors: none");
    } else {
        for (k, v) in &all.errors {
            println!("errors: {v} x {k}");
        }
    }
    Ok(())
}

//! The client's deadlines and its retry window against a TLS server that misbehaves on
//! purpose: a handshake that never ends, an answer that never comes, a long poll whose
//! connection breaks after the retry window's length.

#![allow(clippy::unwrap_used)] // a test: failures should panic loudly

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_cli::client::{Client, ClientError, RETRY_WINDOW, Timeouts};
use berth_cli::config::Target;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server does with the connection numbered by the index.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads the request, then keeps the connection open without answering.
    Silent,
    /// Reads the request, waits, then closes the connection without answering.
    CloseAfter(Duration),
    /// Answers with a sync envelope.
    Answer,
}

struct Server {
    port: u16,
    fingerprint: String,
    connections: Arc<AtomicUsize>,
}

async fn read_head<S: AsyncReadExt + Unpin>(s: &mut S) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        buf.push(byte[0]);
    }
}

async fn tls_server(plan: Vec<Behaviour>) -> Server {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let fingerprint = berth_cli::client::cert_fingerprint(cert.der());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let what = plan.get(n).copied().unwrap_or(Behaviour::Answer);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                read_head(&mut tls).await;
                match what {
                    Behaviour::Silent => tokio::time::sleep(Duration::from_secs(120)).await,
                    Behaviour::CloseAfter(d) => tokio::time::sleep(d).await,
                    Behaviour::Answer => {
                        let body = br#"{"type":"sync","status":"Success","status_code":200,"metadata":{"ok":true}}"#;
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = tls.write_all(head.as_bytes()).await;
                        let _ = tls.write_all(body).await;
                        let _ = tls.shutdown().await;
                    }
                }
            });
        }
    });
    Server {
        port,
        fingerprint,
        connections,
    }
}

fn client(port: u16, fingerprint: &str, timeouts: Timeouts) -> Client {
    Client::new(&Target {
        name: "test".into(),
        url: format!("https://127.0.0.1:{port}"),
        more_urls: vec![],
        key: "k".into(),
        ca_file: None,
        fingerprint: Some(fingerprint.to_string()),
        project: None,
    })
    .unwrap()
    .with_timeouts(timeouts)
}

#[tokio::test]
async fn tls_handshake_has_a_deadline() {
    // Accepts TCP connections and never says a word: the TLS handshake cannot finish.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let c = client(
        port,
        &"0".repeat(64),
        Timeouts {
            tls_handshake: Duration::from_millis(300),
            ..Timeouts::default()
        },
    );
    let started = Instant::now();
    let err = c.call::<()>(Method::GET, "/1.0", None).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[tokio::test]
async fn a_read_without_an_answer_in_time_is_retried() {
    let server = tls_server(vec![Behaviour::Silent]).await;
    let c = client(
        server.port,
        &server.fingerprint,
        Timeouts {
            response: Duration::from_millis(500),
            ..Timeouts::default()
        },
    );
    let resp = c.call::<()>(Method::GET, "/1.0", None).await.unwrap();
    assert_eq!(resp.metadata["ok"], true);
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_write_without_an_answer_in_time_is_not_retried() {
    let server = tls_server(vec![Behaviour::Silent]).await;
    let c = client(
        server.port,
        &server.fingerprint,
        Timeouts {
            response: Duration::from_millis(500),
            ..Timeouts::default()
        },
    );
    let err = c
        .call(Method::POST, "/1.0/instances", Some(&serde_json::json!({})))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_long_poll_broken_after_the_retry_window_is_retried() {
    // The wait's connection breaks later than RETRY_WINDOW after it was sent: the window
    // counts from that failure, so the wait is sent again.
    let server = tls_server(vec![Behaviour::CloseAfter(
        RETRY_WINDOW + Duration::from_secs(1),
    )])
    .await;
    let c = client(server.port, &server.fingerprint, Timeouts::default());
    let resp = c
        .call::<()>(Method::GET, "/1.0/operations/abc/wait?timeout=30", None)
        .await
        .unwrap();
    assert_eq!(resp.metadata["ok"], true);
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn deadlines_per_path() {
    let t = Timeouts::default();
    assert_eq!(t.for_path("/1.0/instances"), t.response);
    assert_eq!(
        t.for_path("/1.0/operations/x/wait?timeout=30"),
        Duration::from_secs(30) + t.long_poll_margin
    );
    assert_eq!(
        t.for_path("/1.0/operations/x/wait"),
        Duration::from_secs(3600) + t.long_poll_margin
    );
    assert_eq!(
        t.for_path("/1.0/operations/x/wait?timeout=-1"),
        Duration::from_secs(3600) + t.long_poll_margin
    );
}

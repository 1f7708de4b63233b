//! gRPC clients to node agents, over mutual TLS with the cluster CA.
//!
//! One lazily connected channel per node; tonic reconnects by itself when an agent restarts.
//! Every call carries the caller's trace context (W3C `traceparent`) when spans are exported,
//! so the agent's spans join the controller's trace.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use berth_proto::v1::agent_client::AgentClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::state::Node;

/// The interceptor every agent call goes through: it adds the trace context.
pub type TraceInterceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// A client to one agent.
pub type AgentConn = AgentClient<InterceptedService<Channel, TraceInterceptor>>;

/// Agent calls that can take long (image builds, clean stops) get this deadline.
pub const LONG_CALL: Duration = Duration::from_secs(30 * 60);

/// Quick agent calls (state, lists, config, small file operations) get this deadline, so that
/// a stalled agent cannot hold a request, or an instance's lock, forever.
pub const SHORT_CALL: Duration = Duration::from_secs(30);

/// A request with the [`SHORT_CALL`] deadline.
pub fn short<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(SHORT_CALL);
    req
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node {0} has an invalid address")]
    BadAddress(String),
    #[error("tls setup for node {node} failed: {message}")]
    Tls { node: String, message: String },
}

/// Clients to every agent this controller talks to.
pub struct AgentPool {
    ca_pem: String,
    identity_cert: String,
    identity_key: String,
    channels: Mutex<HashMap<String, (String, Channel)>>,
}

impl AgentPool {
    /// `cert`/`key`: this controller's client certificate, signed by the cluster CA.
    pub fn new(ca_pem: String, cert_pem: String, key_pem: String) -> Self {
        AgentPool {
            ca_pem,
            identity_cert: cert_pem,
            identity_key: key_pem,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for `node`'s agent (connected lazily, cheap to clone).
    pub fn client(&self, node: &Node) -> Result<AgentConn, AgentError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((addr, ch)) = channels.get(&node.name)
            && *addr == node.address
        {
            return Ok(Self::wrap(ch.clone()));
        }
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.identity_cert, &self.identity_key))
            .domain_name(agent_tls_name(&node.name));
        let endpoint = Endpoint::from_shared(format!("https://{}", node.address))
            .map_err(|_| AgentError::BadAddress(node.name.clone()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .tls_config(tls)
            .map_err(|e| AgentError::Tls {
                node: node.name.clone(),
                message: e.to_string(),
            })?;
        let channel = endpoint.connect_lazy();
        channels.insert(node.name.clone(), (node.address.clone(), channel.clone()));
        Ok(Self::wrap(channel))
    }

    fn wrap(channel: Channel) -> AgentConn {
        let inject: TraceInterceptor = berth_proto::telemetry::inject_trace_context;
        AgentClient::with_interceptor(channel, inject)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

/// The DNS name an agent's certificate carries and a controller checks.
pub fn agent_tls_name(node: &str) -> String {
    format!("{node}.agent.berth")
}

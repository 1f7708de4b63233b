//! The opaque payload of the Raft gRPC messages: openraft's own requests and replies, as JSON.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest Raft gRPC message accepted (log batches and snapshot chunks are JSON-encoded, so a
/// 1 MiB snapshot chunk takes about 4 MiB on the wire).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Encodes a Raft message.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(value)
}

/// Decodes a Raft message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

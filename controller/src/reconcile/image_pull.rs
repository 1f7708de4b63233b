//! Images across the cluster: a node that lacks the image a create needs gets it streamed
//! from a node that holds it (fingerprint verified); concurrent creates on one node share one
//! pull.
//!
//! A pull: a random ticket, `ExpectTransfer{kind: IMAGE}` on the receiving node, `SendImage` on
//! a holder (the holder's agent streams the image volume to the receiver's `Transfer` service,
//! which checks every volume's sha256), `CommitTransfer` on the receiver, then `ListImages` on
//! the receiver must show the expected fingerprint before `SetImageLocation{present: true}` is
//! committed. A pull that fails half-way aborts the transfer on both sides.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use berth_proto::v1;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tracing::{info, warn};

use super::{Outcome, call, passing};
use crate::agents::{LONG_CALL, SHORT_CALL};
use crate::api::AppState;
use crate::state::{Command, Node, NodeStatus, State};

/// How a pull failed: `passing` failures (a node unreachable, busy) are retried by the
/// reconciler; the others end the create with `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullError {
    /// The failure may go away by itself.
    pub passing: bool,
    /// One sentence saying what failed and why.
    pub message: String,
}

impl PullError {
    fn failed(message: String) -> PullError {
        PullError {
            passing: false,
            message,
        }
    }

    fn into_outcome(self) -> Outcome {
        if self.passing {
            Outcome::Retry(self.message)
        } else {
            Outcome::Failed(None, self.message)
        }
    }
}

type PullResult = Result<(), PullError>;
type SharedPull = Shared<BoxFuture<'static, PullResult>>;

/// Pulls in flight, by `(fingerprint, node)`, shared by the creates that wait for them.
#[derive(Default)]
pub struct ImagePulls {
    inflight: Mutex<HashMap<(String, String), SharedPull>>,
}

impl ImagePulls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), SharedPull>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the pull of `(fingerprint, node)`: joins the one in flight, or starts one
    /// with `start` when there is none. Every waiter gets the same result; the map's lock is
    /// never held across an await.
    pub async fn join<F, Fut>(&self, fingerprint: &str, node: &str, start: F) -> PullResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = PullResult> + Send + 'static,
    {
        let key = (fingerprint.to_string(), node.to_string());
        let pull = self
            .lock()
            .entry(key.clone())
            .or_insert_with(|| start().boxed().shared())
            .clone();
        let result = pull.clone().await;
        let mut inflight = self.lock();
        if inflight.get(&key).is_some_and(|p| p.ptr_eq(&pull)) {
            inflight.remove(&key);
        }
        result
    }

    /// How many pulls are in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}

/// Makes sure `node` holds the image `fingerprint`, pulling it from a peer when it does not.
/// `Err` carries how the create ends (or retries).
pub(super) async fn ensure_image(
    state: &Arc<AppState>,
    fingerprint: &str,
    node: &Node,
) -> Result<(), Outcome> {
    let held = state.cp.read_local(|s| {
        s.images
            .get(fingerprint)
            .map(|i| i.locations.contains(&node.name))
    });
    match held {
        Some(true) => return Ok(()),
        Some(false) => {}
        None => {
            return Err(Outcome::Failed(
                None,
                format!("image {fingerprint} of the instance does not exist"),
            ));
        }
    }
    let st = state.clone();
    let fp = fingerprint.to_string();
    let target = node.clone();
    state
        .image_pulls
        .join(fingerprint, &node.name, move || async move {
            pull(&st, &fp, &target).await
        })
        .await
        .map_err(PullError::into_outcome)
}

/// The online nodes other than `node` that hold the image, origins first (they built or
/// published it), then by name; `Err` when there are none.
fn holders(state: &Arc<AppState>, fingerprint: &str, node: &str) -> Result<Vec<Node>, PullError> {
    state.cp.read_local(|s| holders_in(s, fingerprint, node))
}

/// [`holders`] in the state `s`.
fn holders_in(s: &State, fingerprint: &str, node: &str) -> Result<Vec<Node>, PullError> {
    let Some(image) = s.images.get(fingerprint) else {
        return Err(PullError::failed(format!(
            "image {fingerprint} does not exist"
        )));
    };
    let mut online: Vec<Node> = image
        .locations
        .iter()
        .filter(|n| n.as_str() != node)
        .filter_map(|n| s.nodes.get(n))
        .filter(|n| n.status == NodeStatus::Online)
        .cloned()
        .collect();
    online.sort_by_key(|n| (!image.origins.contains(&n.name), n.name.clone()));
    if online.is_empty() {
        let any = image
            .locations
            .iter()
            .any(|n| n != node && s.nodes.contains_key(n));
        return Err(PullError {
            // An offline holder may return.
            passing: any,
            message: if any {
                format!(
                    "no node that holds image {fingerprint} is online to send it to node {node}"
                )
            } else {
                format!("no node holds image {fingerprint}")
            },
        });
    }
    Ok(online)
}

/// One pull of `fingerprint` to `node`: from each online holder in turn until one succeeds.
async fn pull(state: &Arc<AppState>, fingerprint: &str, node: &Node) -> PullResult {
    let mut receiver = state
        .agents
        .client(node)
        .map_err(|e| PullError::failed(e.to_string()))?;
    // The bytes may be there already (an earlier pull whose record was not written).
    let there = has_image(&mut receiver, fingerprint)
        .await
        .map_err(|e| PullError {
            passing: passing(&e),
            message: format!(
                "could not list the images of node {}: {}",
                node.name,
                e.message()
            ),
        })?;
    if !there {
        let mut last = None;
        for holder in holders(state, fingerprint, &node.name)? {
            match pull_from(state, &mut receiver, fingerprint, node, &holder).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    warn!(image = fingerprint, node = %node.name, from = %holder.name, error = %e.message, "image pull failed");
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
    }
    state
        .cp
        .write(Command::SetImageLocation {
            fingerprint: fingerprint.to_string(),
            node: node.name.clone(),
            present: true,
        })
        .await
        .map_err(|e| PullError {
            passing: true,
            message: format!(
                "image {fingerprint} reached node {} but could not be recorded: {e}",
                node.name
            ),
        })?;
    Ok(())
}

/// Whether the node's agent lists the image.
async fn has_image(
    client: &mut crate::agents::AgentConn,
    fingerprint: &str,
) -> Result<bool, tonic::Status> {
    let images = client
        .list_images(call(v1::ListImagesRequest {}, SHORT_CALL))
        .await?
        .into_inner()
        .images;
    Ok(images.iter().any(|i| i.fingerprint == fingerprint))
}

/// A random transfer ticket.
fn new_ticket() -> Result<String, PullError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| PullError::failed(format!("no randomness for a transfer ticket: {e}")))?;
    Ok(hex::encode(bytes))
}

/// The error of a failed agent call (`what`) while fetching image `fingerprint` to `node`
/// from `holder`.
fn fetch_failed(
    fingerprint: &str,
    node: &Node,
    holder: &Node,
    what: &str,
    e: &tonic::Status,
) -> PullError {
    PullError {
        passing: passing(e),
        message: format!(
            "could not fetch image {fingerprint} to node {} from node {}: {what}: {}",
            node.name,
            holder.name,
            e.message()
        ),
    }
}

/// Streams the image from `holder` to `node`, commits it there and checks its fingerprint.
async fn pull_from(
    state: &Arc<AppState>,
    receiver: &mut crate::agents::AgentConn,
    fingerprint: &str,
    node: &Node,
    holder: &Node,
) -> PullResult {
    let fail = |what: &str, e: &tonic::Status| fetch_failed(fingerprint, node, holder, what, e);
    let ticket = new_ticket()?;
    let mut sender = state.agents.client(holder).map_err(|e| {
        PullError::failed(format!(
            "could not fetch image {fingerprint} to node {} from node {}: {e}",
            node.name, holder.name
        ))
    })?;
    info!(image = fingerprint, node = %node.name, from = %holder.name, "pulling image");
    receiver
        .expect_transfer(call(
            v1::ExpectTransferRequest {
                ticket: ticket.clone(),
                kind: v1::TransferKind::Image as i32,
                name: fingerprint.to_string(),
                source_node: holder.name.clone(),
                refresh: false,
            },
            SHORT_CALL,
        ))
        .await
        .map_err(|e| fail("the receiver refused the transfer", &e))?;
    let sent = send(&mut sender, &ticket, fingerprint, node).await;
    let result = match sent {
        Err(e) => Err(fail("sending failed", &e)),
        Ok(false) => Err(PullError {
            passing: true,
            message: format!(
                "could not fetch image {fingerprint} to node {} from node {}: the stream ended before the sender said it was done",
                node.name, holder.name
            ),
        }),
        Ok(true) => commit(receiver, &ticket, fingerprint, node, holder).await,
    };
    if result.is_err() {
        abort(receiver, &ticket, node).await;
        abort(&mut sender, &ticket, holder).await;
    } else {
        info!(image = fingerprint, node = %node.name, from = %holder.name, "image pulled");
    }
    result
}

/// Runs `SendImage` on the holder to its end: `true` when the last report said done.
async fn send(
    sender: &mut crate::agents::AgentConn,
    ticket: &str,
    fingerprint: &str,
    node: &Node,
) -> Result<bool, tonic::Status> {
    let mut stream = sender
        .send_image(call(
            v1::SendImageRequest {
                ticket: ticket.to_string(),
                fingerprint: fingerprint.to_string(),
                target_address: node.address.clone(),
                target_node: node.name.clone(),
            },
            LONG_CALL,
        ))
        .await?
        .into_inner();
    let mut done = false;
    while let Some(progress) = stream.message().await? {
        done = progress.done;
    }
    Ok(done)
}

/// Commits the received image on `node` and checks that it lists the expected fingerprint.
async fn commit(
    receiver: &mut crate::agents::AgentConn,
    ticket: &str,
    fingerprint: &str,
    node: &Node,
    holder: &Node,
) -> PullResult {
    let fail = |what: &str, e: &tonic::Status| fetch_failed(fingerprint, node, holder, what, e);
    receiver
        .commit_transfer(call(
            v1::TransferRef {
                ticket: ticket.to_string(),
            },
            LONG_CALL,
        ))
        .await
        .map_err(|e| fail("the receiver could not commit it", &e))?;
    let there = has_image(receiver, fingerprint)
        .await
        .map_err(|e| fail("the receiver's images could not be listed", &e))?;
    if !there {
        return Err(PullError::failed(format!(
            "could not fetch image {fingerprint} to node {} from node {}: the received image does not have the expected fingerprint",
            node.name, holder.name
        )));
    }
    Ok(())
}

/// Drops what a failed transfer left on `node` (best effort: an agent restart also forgets
/// its tickets and staged volumes).
async fn abort(client: &mut crate::agents::AgentConn, ticket: &str, node: &Node) {
    if let Err(e) = client
        .abort_transfer(call(
            v1::TransferRef {
                ticket: ticket.to_string(),
            },
            SHORT_CALL,
        ))
        .await
    {
        warn!(node = %node.name, ticket, error = %e.message(), "could not abort an image transfer");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_share_one_pull() {
        let pulls = Arc::new(ImagePulls::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut waiters = Vec::new();
        for _ in 0..8 {
            let pulls = pulls.clone();
            let calls = calls.clone();
            let mut gate = gate.clone();
            waiters.push(tokio::spawn(async move {
                pulls
                    .join("fp", "n2", move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.wait_for(|open| *open).await.unwrap();
                        Err(PullError::failed("boom".into()))
                    })
                    .await
            }));
        }
        // Every waiter is in before the fetch may end.
        while pulls.in_flight() == 0 || calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        release.send(true).unwrap();
        for w in waiters {
            assert_eq!(w.await.unwrap(), Err(PullError::failed("boom".into())));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(pulls.in_flight(), 0);
        // A later pull starts afresh; another node is another pull.
        let again = pulls.join("fp", "n2", || async { Ok(()) }).await;
        assert_eq!(again, Ok(()));
        let other = pulls.join("fp", "n3", || async { Ok(()) }).await;
        assert_eq!(other, Ok(()));
        assert_eq!(pulls.in_flight(), 0);
    }

    #[test]
    fn holders_are_online_origins_first() {
        let mut s = State::default();
        for (name, status) in [
            ("n1", NodeStatus::Online),
            ("n2", NodeStatus::Online),
            ("n3", NodeStatus::Offline),
            ("n4", NodeStatus::Online),
        ] {
            s.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    status,
                    ..Default::default()
                },
            );
        }
        s.images.insert(
            "fp".into(),
            crate::state::Image {
                fingerprint: "fp".into(),
                locations: ["n1", "n2", "n3"].iter().map(|n| n.to_string()).collect(),
                origins: ["n2".to_string()].into(),
                ..Default::default()
            },
        );
        let names = |r: Result<Vec<Node>, PullError>| -> Vec<String> {
            r.unwrap().into_iter().map(|n| n.name).collect()
        };
        assert_eq!(names(holders_in(&s, "fp", "n4")), ["n2", "n1"]);
        assert_eq!(names(holders_in(&s, "fp", "n2")), ["n1"]);
        // Only an offline holder: passing; no holder at all, or no image: for good.
        s.images.get_mut("fp").unwrap().locations = ["n3".to_string()].into();
        assert!(holders_in(&s, "fp", "n4").unwrap_err().passing);
        s.images.get_mut("fp").unwrap().locations.clear();
        let none = holders_in(&s, "fp", "n4").unwrap_err();
        assert_eq!(none, PullError::failed("no node holds image fp".into()));
        assert!(!holders_in(&s, "gone", "n4").unwrap_err().passing);
    }

    #[test]
    fn passing_failures_retry() {
        let p = PullError {
            passing: true,
            message: "x".into(),
        };
        assert!(matches!(p.into_outcome(), Outcome::Retry(m) if m == "x"));
        assert!(matches!(
            PullError::failed("y".into()).into_outcome(),
            Outcome::Failed(None, m) if m == "y"
        ));
    }
}

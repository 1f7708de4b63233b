//! Placement: a pure function from the cluster state and a request to a node.
//!
//! (Interim version: the full scheduler with filters, scoring and placement groups replaces
//! the body of [`place_instance`], keeping its signature.)

use std::collections::BTreeMap;

use crate::state::{Instance, NodeStatus, State};

/// Why no node could be chosen. The message is one sentence for the API's 4xx answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlacementError(pub String);

/// What is allocated on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub instances: u32,
    /// Sum of the instances' `limits.cpu` (instances without it count as one CPU).
    pub cpus: u64,
    /// Sum of the instances' `limits.memory` in bytes (0 for instances without it).
    pub memory_bytes: u64,
}

/// Picks the node for `instance` (not yet in `state`). A non-empty `instance.node` is a target:
/// it must exist and be online. Otherwise the online node with the fewest instances wins
/// (ties broken by name, so the choice is stable).
pub fn place_instance(state: &State, instance: &Instance) -> Result<String, PlacementError> {
    let has_image = |node: &str| {
        state
            .images
            .get(&instance.image)
            .is_some_and(|i| i.locations.contains(node))
    };
    let target = instance.node.as_str();
    if !target.is_empty() {
        return match state.nodes.get(target) {
            Some(n) if n.status != NodeStatus::Online => {
                Err(PlacementError(format!("node {target} is offline")))
            }
            Some(n) if !has_image(&n.name) => Err(PlacementError(format!(
                "node {target} does not hold the instance's image"
            ))),
            Some(n) => Ok(n.name.clone()),
            None => Err(PlacementError(format!("node {target} does not exist"))),
        };
    }
    let usage = node_usage(state);
    state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Online && has_image(&n.name))
        .min_by_key(|n| {
            (
                usage.get(&n.name).map(|u| u.instances).unwrap_or(0),
                n.name.clone(),
            )
        })
        .map(|n| n.name.clone())
        .ok_or_else(|| {
            PlacementError("no online node holds the image to place the instance on".into())
        })
}

/// What is allocated on every node that has instances.
pub fn node_usage(state: &State) -> BTreeMap<String, NodeUsage> {
    let mut out: BTreeMap<String, NodeUsage> = BTreeMap::new();
    for i in state.instances.values() {
        let u = out.entry(i.node.clone()).or_default();
        u.instances += 1;
        u.cpus += i
            .config
            .get("limits.cpu")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        u.memory_bytes += i
            .config
            .get("limits.memory")
            .and_then(|v| berth_proto::api::config::parse_bytes(v).ok())
            .unwrap_or(0);
    }
    out
}

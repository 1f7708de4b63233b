//! Placement: a pure function from the cluster state and a request to a node.

use crate::state::{NodeStatus, State};

/// Picks the node for a new instance: `target` when given (it must exist and be online), else
/// the online node with the fewest instances (ties broken by name, so the choice is stable).
pub fn place(state: &State, target: Option<&str>) -> Result<String, String> {
    if let Some(t) = target.filter(|t| !t.is_empty()) {
        return match state.nodes.get(t) {
            Some(n) if n.status == NodeStatus::Online => Ok(n.name.clone()),
            Some(_) => Err(format!("node {t} is offline")),
            None => Err(format!("node {t} does not exist")),
        };
    }
    state
        .nodes
        .values()
        .filter(|n| n.status == NodeStatus::Online)
        .min_by_key(|n| {
            let load = state
                .instances
                .values()
                .filter(|i| i.node == n.name)
                .count();
            (load, n.name.clone())
        })
        .map(|n| n.name.clone())
        .ok_or_else(|| "no node is online to place the instance on".to_string())
}

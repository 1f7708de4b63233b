//! Placement: a pure function from the cluster state and a request to a node.
//!
//! It runs inside the Raft state machine's apply on every controller, so it uses no clock, no
//! randomness and no I/O, and walks only ordered maps: every controller reaches the same answer.
//!
//! [`place_instance`] builds a [`ClusterView`] (per-node capacity and allocation, per-group
//! member counts) in one pass over the state, reads the instance into a [`Request`] and asks the
//! view. The view can also be driven incrementally ([`ClusterView::place`], then
//! [`ClusterView::commit`]), which is how the simulation benchmark places 10,000 instances.
//!
//! Filters, in the order a rejected node is counted against them: offline, evacuated,
//! `scheduler.instance=manual` (only without a target), architecture, an image no node holds
//! (a node without it pulls it first), `placement.constraints`, a strict placement group, CPU,
//! memory, storage. Scoring (lowest wins): the placement group's preference, then the policy's
//! (`spread`: least allocated fraction after placing, then fewest instances; `binpack`: the
//! reverse), then image locality, then the node's name.

pub(crate) mod view;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use berth_proto::api::config;

use crate::state::{Instance, Node, State};

pub use view::{ClusterView, CpuClaim, Group, NodeView, Request};

/// Why no node could be chosen. The message is one sentence for the API's 4xx answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlacementError(pub String);

/// What is allocated on one node: the sum of its instances' limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUsage {
    /// Instances placed on the node.
    pub instances: u32,
    /// CPUs claimed by `limits.cpu` (a count, or the size of a CPU set); instances without
    /// the key claim none.
    pub cpus: u64,
    /// Bytes claimed by `limits.memory` (a percentage counts against the node's memory);
    /// instances without the key claim none.
    pub memory_bytes: u64,
}

impl NodeUsage {
    /// Adds one instance with `config` on a node with `node_memory_bytes` of memory. Values
    /// that do not parse (never stored: the API validates them) claim nothing.
    pub fn add(&mut self, config: &BTreeMap<String, String>, node_memory_bytes: u64) {
        self.instances += 1;
        self.cpus += CpuClaim::from_config(config)
            .map(|c| c.count())
            .unwrap_or(0);
        self.memory_bytes = self.memory_bytes.saturating_add(
            view::memory_claim(config)
                .ok()
                .flatten()
                .map(|m| m.bytes(node_memory_bytes))
                .unwrap_or(0),
        );
    }
}

/// How the scheduler ranks the nodes that pass the filters (cluster config `scheduler.policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// The least allocated node first: instances spread evenly over the cluster.
    #[default]
    Spread,
    /// The most allocated node that still fits first: whole nodes stay free.
    Binpack,
}

/// Cluster config key choosing the [`Policy`].
pub const POLICY_KEY: &str = "scheduler.policy";

/// Node config key: `all` (default) or `manual` (only a `--target` places instances there).
pub const NODE_INSTANCE_KEY: &str = "scheduler.instance";

impl Policy {
    /// Parses `spread` or `binpack`.
    pub fn parse(value: &str) -> Result<Policy, String> {
        match value.trim() {
            "spread" => Ok(Policy::Spread),
            "binpack" => Ok(Policy::Binpack),
            _ => Err(format!(
                "{POLICY_KEY} \"{}\" must be spread or binpack",
                value.escape_debug()
            )),
        }
    }

    /// The cluster's policy; `spread` when unset (or unreadable, which validation prevents).
    pub fn of_cluster(state: &State) -> Policy {
        state
            .cluster
            .config
            .get(POLICY_KEY)
            .and_then(|v| Policy::parse(v).ok())
            .unwrap_or_default()
    }
}

/// Picks the node for `instance` (not yet in `state`). A non-empty `instance.node` is a target:
/// it must exist and pass every filter but `scheduler.instance=manual`.
pub fn place_instance(state: &State, instance: &Instance) -> Result<String, PlacementError> {
    // A copy, or an instance that exists already (placed again to move it), brings its own
    // root filesystem: the image it was once made from may be gone.
    let brings_data = state.instances.contains_key(&instance.name)
        || matches!(
            &instance.pending,
            Some(crate::state::PendingAction {
                action: crate::state::Action::CopyFrom { .. },
                ..
            })
        );
    let stand_in;
    let image = match state.images.get(&instance.image) {
        Some(image) => image,
        None if brings_data => {
            stand_in = crate::state::Image {
                fingerprint: instance.image.clone(),
                locations: state.nodes.keys().cloned().collect(),
                ..Default::default()
            };
            &stand_in
        }
        None => {
            return Err(PlacementError(format!(
                "image {} of the instance does not exist",
                instance.image
            )));
        }
    };
    let view = ClusterView::new(state);
    // Placement reads the config the instance will run with: its profiles', then its own.
    let expanded;
    let instance = match state.effective_config(instance) {
        std::borrow::Cow::Borrowed(_) => instance,
        std::borrow::Cow::Owned(config) => {
            expanded = Instance {
                config,
                ..instance.clone()
            };
            &expanded
        }
    };
    let request = view.request(instance, image)?;
    let chosen = view.place(&request)?;
    Ok(view.node(chosen).name.clone())
}

/// What is allocated on every node (zero for nodes without instances; instances whose node is
/// not in the state are counted under that name too).
pub fn node_usage(state: &State) -> BTreeMap<String, NodeUsage> {
    let mut out: BTreeMap<String, NodeUsage> = state
        .nodes
        .keys()
        .map(|name| (name.clone(), NodeUsage::default()))
        .collect();
    for i in state.instances.values() {
        let memory = state.nodes.get(&i.node).map_or(0, |n| n.memory_bytes);
        out.entry(i.node.clone())
            .or_default()
            .add(&state.effective_config(i), memory);
    }
    out
}

/// Checks a cluster-wide config key and value (`PATCH /1.0/cluster`). Supported:
/// `scheduler.policy` = `spread` | `binpack`; `images.remote_cache_expiry` = days (0 never).
pub fn validate_cluster_config_key(key: &str, value: &str) -> Result<(), String> {
    match key {
        POLICY_KEY => Policy::parse(value).map(drop),
        crate::image_cache::EXPIRY_KEY => crate::image_cache::parse_expiry(value).map(drop),
        _ => Err(format!("unknown cluster config key {}", key.escape_debug())),
    }
}

/// Checks a node config key and value (`berth cluster set NODE KEY VALUE`):
/// `scheduler.instance` = `all` | `manual`; any other key outside `scheduler.` is a label that
/// overrides the agent's label of the same key.
pub fn validate_node_config_key(key: &str, value: &str) -> Result<(), String> {
    match key {
        NODE_INSTANCE_KEY => match value.trim() {
            "all" | "manual" => Ok(()),
            _ => Err(format!(
                "{NODE_INSTANCE_KEY} \"{}\" must be all or manual",
                value.escape_debug()
            )),
        },
        k if k.starts_with("scheduler.") => {
            Err(format!("unknown node config key {}", k.escape_debug()))
        }
        k => config::validate_label(k, value).map_err(|e| e.0),
    }
}

/// The labels the scheduler matches constraints against: the agent's labels overlaid by the
/// node config keys that do not start with `scheduler.`.
pub fn effective_labels(node: &Node) -> BTreeMap<String, String> {
    let mut labels = node.labels.clone();
    for (k, v) in &node.config {
        if !k.starts_with("scheduler.") {
            labels.insert(k.clone(), v.clone());
        }
    }
    labels
}

/// Whether the node is kept out of automatic placement (`scheduler.instance=manual`).
pub fn is_manual(node: &Node) -> bool {
    node.config
        .get(NODE_INSTANCE_KEY)
        .is_some_and(|v| v.trim() == "manual")
}

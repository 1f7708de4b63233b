//! The compact view the scheduler decides over, and the decision itself.

use std::collections::BTreeMap;

use berth_proto::api::config::{
    self, ConfigError, Constraint, CpuLimit, GroupEnforce, GroupPolicy, MemoryLimit,
};

use super::{NodeUsage, PlacementError, Policy, effective_labels, is_manual};
use crate::state::{Image, Instance, Node, NodeStatus, State};

/// Whether a node must hold the instance's image. It need not: a node that lacks it pulls it
/// from a node that holds it before the create ([`crate::reconcile`]), so locality is only the
/// score's tie-breaker. An image that no node holds still keeps every node out (nobody could
/// send it).
const IMAGE_LOCALITY_REQUIRED: bool = false;

/// Fractions are compared as integers in billionths, so no float rounding reaches a decision.
const ONE: u64 = 1_000_000_000;

/// For scoring only, an instance without `limits.cpu` counts as this many thousandths of a CPU
/// (it claims nothing for the filters). Without a nominal size, binpack would pile every
/// unlimited instance onto the fullest node, and spread would ignore them next to limited ones.
pub const NOMINAL_MILLICPUS: u64 = 100;

/// For scoring only, an instance without `limits.memory` counts as this many bytes.
pub const NOMINAL_MEMORY_BYTES: u64 = 128 << 20;

/// One node as the scheduler sees it: capacity, what it accepts, what is allocated on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// Status is online.
    pub online: bool,
    /// The node is evacuated.
    pub evacuated: bool,
    /// `scheduler.instance=manual`: only a target places instances here.
    pub manual: bool,
    /// CPUs (0 = unknown: not checked).
    pub cpus: u32,
    /// Memory in bytes (0 = unknown: not checked).
    pub memory_bytes: u64,
    /// Storage pool size (0 = unknown: storage is not checked).
    pub storage_total_bytes: u64,
    /// Free storage as last reported.
    pub storage_free_bytes: u64,
    /// CPU architecture ("" = unknown: any image is accepted).
    pub architecture: String,
    /// Effective labels (see [`effective_labels`]).
    pub labels: BTreeMap<String, String>,
    /// What is allocated on it.
    pub usage: NodeUsage,
    /// Allocation as the score counts it: thousandths of a CPU and bytes, with instances
    /// without limits at their nominal size.
    scored_millicpus: u64,
    scored_memory_bytes: u64,
}

impl NodeView {
    /// The view of `node`, with nothing allocated yet.
    pub fn from_node(node: &Node) -> NodeView {
        NodeView {
            name: node.name.clone(),
            online: node.status == NodeStatus::Online,
            evacuated: node.evacuated,
            manual: is_manual(node),
            cpus: node.cpus,
            memory_bytes: node.memory_bytes,
            storage_total_bytes: node.storage_total_bytes,
            storage_free_bytes: node.storage_free_bytes,
            architecture: node.architecture.clone(),
            labels: effective_labels(node),
            usage: NodeUsage::default(),
            scored_millicpus: 0,
            scored_memory_bytes: 0,
        }
    }

    /// Adds an instance claiming `cpu` and `memory`.
    fn add(&mut self, cpu: &CpuClaim, memory: Option<MemoryLimit>) {
        let (millicpus, memory_bytes) = self.scored_claim(cpu, memory);
        self.scored_millicpus = self.scored_millicpus.saturating_add(millicpus);
        self.scored_memory_bytes = self.scored_memory_bytes.saturating_add(memory_bytes);
        let u = &mut self.usage;
        u.instances += 1;
        u.cpus = u.cpus.saturating_add(cpu.count());
        u.memory_bytes = u
            .memory_bytes
            .saturating_add(memory.map_or(0, |m| m.bytes(self.memory_bytes)));
    }

    /// What an instance adds to the scored allocation: its limits, or the nominal sizes.
    fn scored_claim(&self, cpu: &CpuClaim, memory: Option<MemoryLimit>) -> (u64, u64) {
        let millicpus = match cpu {
            CpuClaim::None => NOMINAL_MILLICPUS,
            c => c.count().saturating_mul(1000),
        };
        let memory = memory.map_or(NOMINAL_MEMORY_BYTES, |m| m.bytes(self.memory_bytes));
        (millicpus, memory)
    }

    /// The larger of the CPU and memory fractions of the scored allocation once an instance
    /// claiming `cpu` and `memory` is added, in billionths (it may exceed one billion).
    fn fraction_after(&self, cpu: &CpuClaim, memory: Option<MemoryLimit>) -> u64 {
        let (millicpus, bytes) = self.scored_claim(cpu, memory);
        let cpu = fraction(
            self.scored_millicpus.saturating_add(millicpus),
            u64::from(self.cpus).saturating_mul(1000),
        );
        let mem = fraction(
            self.scored_memory_bytes.saturating_add(bytes),
            self.memory_bytes,
        );
        cpu.max(mem)
    }
}

fn fraction(used: u64, capacity: u64) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let f = u128::from(used) * u128::from(ONE) / u128::from(capacity);
    u64::try_from(f).unwrap_or(u64::MAX)
}

/// The CPUs an instance claims through `limits.cpu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuClaim {
    /// No `limits.cpu`: claims nothing.
    None,
    /// A count of CPUs.
    Count(u32),
    /// An explicit set: claims its size; the node must have its highest CPU id.
    Set {
        /// How many CPUs are in the set.
        count: u32,
        /// The highest CPU id in the set.
        highest: u32,
        /// The set as written back ("0-3,6").
        text: String,
    },
}

impl CpuClaim {
    /// Reads `limits.cpu` from an instance config.
    pub fn from_config(config: &BTreeMap<String, String>) -> Result<CpuClaim, ConfigError> {
        let Some(value) = config.get("limits.cpu") else {
            return Ok(CpuClaim::None);
        };
        Ok(match config::parse_cpu(value)? {
            CpuLimit::Count(n) => CpuClaim::Count(n),
            CpuLimit::Set(ids) => CpuClaim::Set {
                count: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                highest: ids.last().copied().unwrap_or(0),
                text: config::format_cpu_set(&ids),
            },
        })
    }

    /// How many CPUs are claimed.
    pub fn count(&self) -> u64 {
        match self {
            CpuClaim::None => 0,
            CpuClaim::Count(n) | CpuClaim::Set { count: n, .. } => u64::from(*n),
        }
    }
}

/// Reads `limits.memory` from an instance config (`None` without the key).
pub(super) fn memory_claim(
    config: &BTreeMap<String, String>,
) -> Result<Option<MemoryLimit>, ConfigError> {
    config
        .get("limits.memory")
        .map(|v| config::parse_memory(v))
        .transpose()
}

/// The placement group an instance belongs to, with the rule it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// `placement.group`.
    pub name: String,
    /// The group's identity: groups belong to a project (`scoped_name(project, name)`), so
    /// one tenant's group never meets, reveals or blocks another's.
    pub key: String,
    /// `placement.group.policy` (default spread).
    pub policy: GroupPolicy,
    /// `placement.group.enforce` (default strict).
    pub enforce: GroupEnforce,
}

/// What one instance asks of a node, read once from its config and image.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    target: Option<&'a str>,
    cpu: CpuClaim,
    memory: Option<MemoryLimit>,
    image: &'a Image,
    /// Per node of the view: whether it holds the image.
    holds_image: Vec<bool>,
    /// Some node of the view holds the image (so the others can pull it).
    image_held: bool,
    constraints: Vec<Constraint>,
    group: Option<Group>,
}

impl Request<'_> {
    /// The placement group, if the instance is in one.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// The CPUs claimed.
    pub fn cpu(&self) -> &CpuClaim {
        &self.cpu
    }
}

/// Why a node was filtered out. The order is the order of the checks and of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reject {
    Offline,
    Evacuated,
    Manual,
    Architecture,
    Image,
    /// The index of the first constraint term the node fails.
    Constraint(usize),
    GroupSpread,
    GroupCompact,
    CpuSet,
    Cpu,
    Memory,
    Storage,
}

impl Reject {
    /// The reason as a verb phrase, for one node (`singular`) or several.
    fn describe(self, singular: bool, req: &Request<'_>) -> String {
        let verb = |one: &str, many: &str| if singular { one } else { many }.to_string();
        let group = req.group.as_ref().map_or("", |g| g.name.as_str());
        match self {
            Reject::Offline => verb("is offline", "are offline"),
            Reject::Evacuated => verb("is evacuated", "are evacuated"),
            Reject::Manual => verb(
                "takes instances only by target (scheduler.instance=manual)",
                "take instances only by target (scheduler.instance=manual)",
            ),
            Reject::Architecture => {
                format!("{} {}", verb("is not", "are not"), req.image.architecture)
            }
            Reject::Image => verb("does not hold the image", "do not hold the image"),
            Reject::Constraint(i) => {
                let term = req
                    .constraints
                    .get(i)
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                format!("{} {term}", verb("does not match", "do not match"))
            }
            Reject::GroupSpread => format!(
                "{} a member of strict spread group {group}",
                verb("already has", "already have")
            ),
            Reject::GroupCompact => format!(
                "{} no member of strict compact group {group}",
                verb("has", "have")
            ),
            Reject::CpuSet => match &req.cpu {
                CpuClaim::Set { text, .. } => format!("{} CPUs {text}", verb("lacks", "lack")),
                _ => verb("lacks the CPUs", "lack the CPUs"),
            },
            Reject::Cpu => {
                let n = req.cpu.count();
                let s = if n == 1 { "" } else { "s" };
                format!("{} {n} free CPU{s}", verb("lacks", "lack"))
            }
            Reject::Memory => match req.memory {
                Some(MemoryLimit::Bytes(b)) => {
                    format!(
                        "{} {} of free memory",
                        verb("lacks", "lack"),
                        human_bytes(b)
                    )
                }
                Some(MemoryLimit::Percent(p)) => format!(
                    "{} {p}% of {} memory free",
                    verb("lacks", "lack"),
                    verb("its", "their")
                ),
                None => verb("lacks free memory", "lack free memory"),
            },
            Reject::Storage => format!(
                "{} {} of free storage for the image",
                verb("lacks", "lack"),
                human_bytes(req.image.size)
            ),
        }
    }
}

/// A byte count for a message: "4 GiB", "1.5 GiB", "512 MiB", "100 B".
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    // Tenths of the unit, in integers.
    let mut unit = 0;
    let mut div: u128 = 1024;
    while unit + 1 < UNITS.len() && u128::from(b) >= div * 1024 {
        div *= 1024;
        unit += 1;
    }
    let tenths = (u128::from(b) * 10 + div / 2) / div;
    if tenths.is_multiple_of(10) {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// The cluster as the scheduler sees it: every node's capacity and allocation, and where each
/// placement group's members are. Built once per decision by [`super::place_instance`]; kept
/// and updated with [`ClusterView::commit`] by a caller placing many instances in a row.
#[derive(Debug, Clone)]
pub struct ClusterView {
    policy: Policy,
    /// Sorted by name, so the lowest index is the name tie-breaker.
    nodes: Vec<NodeView>,
    index: BTreeMap<String, usize>,
    /// Per group: node index -> members on that node.
    groups: BTreeMap<String, BTreeMap<usize, u32>>,
}

impl ClusterView {
    /// Builds the view in one pass over the nodes and the instances.
    pub fn new(state: &State) -> ClusterView {
        let mut nodes: Vec<NodeView> = state.nodes.values().map(NodeView::from_node).collect();
        let index: BTreeMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let mut groups: BTreeMap<String, BTreeMap<usize, u32>> = BTreeMap::new();
        for inst in state.instances.values() {
            let Some(&i) = index.get(&inst.node) else {
                continue;
            };
            // Values that do not parse (never stored: the API validates them) claim nothing.
            let config = state.effective_config(inst);
            let cpu = CpuClaim::from_config(&config).unwrap_or(CpuClaim::None);
            let memory = memory_claim(&config).ok().flatten();
            nodes[i].add(&cpu, memory);
            if let Some(g) = config.get("placement.group") {
                *groups
                    .entry(crate::state::scoped_name(&inst.project, g.trim()))
                    .or_default()
                    .entry(i)
                    .or_insert(0) += 1;
            }
        }
        ClusterView {
            policy: Policy::of_cluster(state),
            nodes,
            index,
            groups,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Changes the policy (the simulation compares both on the same cluster).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// All nodes, sorted by name.
    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }

    /// The node at `index` (as returned by [`ClusterView::place`]).
    ///
    /// # Panics
    /// When `index` is not below `nodes().len()`.
    pub fn node(&self, index: usize) -> &NodeView {
        &self.nodes[index]
    }

    /// Members of `group` (its key: `scoped_name(project, group)`) per node index.
    pub fn group_members(&self, group: &str) -> Option<&BTreeMap<usize, u32>> {
        self.groups.get(group)
    }

    /// Reads what `instance` asks for (its limits, constraints, group, target) and what its
    /// `image` needs. Fails on a config value that does not parse (the API refuses those).
    pub fn request<'a>(
        &self,
        instance: &'a Instance,
        image: &'a Image,
    ) -> Result<Request<'a>, PlacementError> {
        let bad = |e: ConfigError| PlacementError(e.0);
        let c = &instance.config;
        let cpu = CpuClaim::from_config(c).map_err(bad)?;
        let memory = memory_claim(c).map_err(bad)?;
        let constraints = match c.get("placement.constraints") {
            Some(v) => config::parse_constraints(v).map_err(bad)?,
            None => Vec::new(),
        };
        let group = match c.get("placement.group") {
            Some(name) => Some(Group {
                name: config::parse_placement_group(name)
                    .map_err(bad)?
                    .to_string(),
                key: crate::state::scoped_name(
                    &instance.project,
                    config::parse_placement_group(name).map_err(bad)?,
                ),
                policy: c
                    .get("placement.group.policy")
                    .map(|v| config::parse_group_policy(v))
                    .transpose()
                    .map_err(bad)?
                    .unwrap_or_default(),
                enforce: c
                    .get("placement.group.enforce")
                    .map(|v| config::parse_group_enforce(v))
                    .transpose()
                    .map_err(bad)?
                    .unwrap_or_default(),
            }),
            None => None,
        };
        // Both sides are sorted by name: one merge pass, no lookups.
        let mut locations = image.locations.iter().peekable();
        let holds_image = self
            .nodes
            .iter()
            .map(|n| {
                while locations
                    .next_if(|l| l.as_str() < n.name.as_str())
                    .is_some()
                {}
                locations.next_if(|l| **l == n.name).is_some()
            })
            .collect::<Vec<bool>>();
        let image_held = holds_image.iter().any(|h| *h);
        let target = Some(instance.node.as_str()).filter(|t| !t.is_empty());
        Ok(Request {
            target,
            cpu,
            memory,
            image,
            holds_image,
            image_held,
            constraints,
            group,
        })
    }

    /// Chooses the node for `req`: the index of the best node passing every filter, or an
    /// error saying which filter removed how many nodes.
    pub fn place(&self, req: &Request<'_>) -> Result<usize, PlacementError> {
        let members = req
            .group
            .as_ref()
            .and_then(|g| self.groups.get(&g.key))
            .filter(|m| !m.is_empty());
        if let Some(target) = req.target {
            let Some(&i) = self.index.get(target) else {
                return Err(PlacementError(format!("node {target} does not exist")));
            };
            if let Some(reason) = self.reject(i, req, members, true) {
                return Err(PlacementError(format!(
                    "node {target} {}",
                    reason.describe(true, req)
                )));
            }
            return Ok(i);
        }
        let mut rejected: BTreeMap<Reject, usize> = BTreeMap::new();
        let mut best: Option<(Score, usize)> = None;
        for i in 0..self.nodes.len() {
            if let Some(reason) = self.reject(i, req, members, false) {
                *rejected.entry(reason).or_insert(0) += 1;
                continue;
            }
            let score = self.score(i, req, members);
            if best.as_ref().is_none_or(|(b, _)| score < *b) {
                best = Some((score, i));
            }
        }
        if let Some((_, i)) = best {
            return Ok(i);
        }
        if self.nodes.is_empty() {
            return Err(PlacementError(
                "no node can take the instance: the cluster has no nodes".into(),
            ));
        }
        let reasons: Vec<String> = rejected
            .iter()
            .map(|(reason, &n)| format!("{n} {}", reason.describe(n == 1, req)))
            .collect();
        Err(PlacementError(format!(
            "no node can take the instance: {}",
            reasons.join(", ")
        )))
    }

    /// Records that `req` was placed on node `index`, so the next decision sees it.
    ///
    /// # Panics
    /// When `index` is not below `nodes().len()`.
    pub fn commit(&mut self, index: usize, req: &Request<'_>) {
        self.nodes[index].add(&req.cpu, req.memory);
        if let Some(g) = &req.group {
            *self
                .groups
                .entry(g.key.clone())
                .or_default()
                .entry(index)
                .or_insert(0) += 1;
        }
    }

    /// The first filter node `i` fails, if any. `members`: the request's group's members per
    /// node (`None` when it has none yet). `targeted`: the node was named by the user.
    fn reject(
        &self,
        i: usize,
        req: &Request<'_>,
        members: Option<&BTreeMap<usize, u32>>,
        targeted: bool,
    ) -> Option<Reject> {
        let n = &self.nodes[i];
        if !n.online {
            return Some(Reject::Offline);
        }
        if n.evacuated {
            return Some(Reject::Evacuated);
        }
        if n.manual && !targeted {
            return Some(Reject::Manual);
        }
        let arch = req.image.architecture.as_str();
        if !arch.is_empty() && !n.architecture.is_empty() && n.architecture != arch {
            return Some(Reject::Architecture);
        }
        if !req.holds_image[i] && (IMAGE_LOCALITY_REQUIRED || !req.image_held) {
            return Some(Reject::Image);
        }
        for (k, c) in req.constraints.iter().enumerate() {
            if !c.matches(n.labels.get(&c.key).map(String::as_str)) {
                return Some(Reject::Constraint(k));
            }
        }
        if let Some(g) = &req.group
            && g.enforce == GroupEnforce::Strict
        {
            let here = members.and_then(|m| m.get(&i)).copied().unwrap_or(0);
            match g.policy {
                GroupPolicy::Spread if here > 0 => return Some(Reject::GroupSpread),
                GroupPolicy::Compact if members.is_some() && here == 0 => {
                    return Some(Reject::GroupCompact);
                }
                _ => {}
            }
        }
        if n.cpus > 0 {
            if let CpuClaim::Set { highest, .. } = req.cpu
                && highest >= n.cpus
            {
                return Some(Reject::CpuSet);
            }
            let claim = req.cpu.count();
            if claim > 0 && n.usage.cpus + claim > u64::from(n.cpus) {
                return Some(Reject::Cpu);
            }
        }
        if n.memory_bytes > 0
            && let Some(m) = req.memory
            && n.usage.memory_bytes.saturating_add(m.bytes(n.memory_bytes)) > n.memory_bytes
        {
            return Some(Reject::Memory);
        }
        if n.storage_total_bytes > 0 && req.image.size > n.storage_free_bytes {
            return Some(Reject::Storage);
        }
        None
    }

    /// The node's rank for `req` (lower is better); the index breaks ties.
    fn score(&self, i: usize, req: &Request<'_>, members: Option<&BTreeMap<usize, u32>>) -> Score {
        let n = &self.nodes[i];
        let group = match &req.group {
            None => 0,
            Some(g) => {
                let here = members.and_then(|m| m.get(&i)).copied().unwrap_or(0);
                match g.policy {
                    GroupPolicy::Spread => here,
                    GroupPolicy::Compact => u32::MAX - here,
                }
            }
        };
        let fraction = n.fraction_after(&req.cpu, req.memory);
        let instances = n.usage.instances;
        let (fraction, instances) = match self.policy {
            Policy::Spread => (fraction, instances),
            // The fullest node first, among those the instance leaves at most full; a node it
            // overfills (only possible through nominal sizes) comes last.
            Policy::Binpack if fraction > ONE => (u64::MAX, u32::MAX - instances),
            Policy::Binpack => (ONE - fraction, u32::MAX - instances),
        };
        Score {
            group,
            fraction,
            instances,
            remote_image: !req.holds_image[i],
        }
    }
}

/// A node's rank, compared field by field (derive order), lowest best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Score {
    /// The placement group's preference: members here (spread) or their complement (compact).
    group: u32,
    /// Scored allocated fraction after placing (spread) or its complement (binpack).
    fraction: u64,
    /// Instances on the node (spread) or their complement (binpack).
    instances: u32,
    /// The node lacks the image: locality breaks the remaining ties.
    remote_image: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Image locality breaks the ties the group and the policy leave.
    #[test]
    fn image_locality_breaks_ties() {
        let mut s = State::default();
        for name in ["a", "b"] {
            s.nodes.insert(
                name.into(),
                Node {
                    name: name.into(),
                    cpus: 4,
                    memory_bytes: 1 << 33,
                    ..Default::default()
                },
            );
        }
        let image = Image {
            locations: ["b".to_string()].into(),
            ..Default::default()
        };
        let instance = Instance::default();
        let view = ClusterView::new(&s);
        let req = view.request(&instance, &image).unwrap();
        assert!(view.score(1, &req, None) < view.score(0, &req, None));
        assert_eq!(view.place(&req), Ok(1));
        // A node without the image is acceptable (it pulls the image first).
        let on_a = Instance {
            node: "a".into(),
            ..Instance::default()
        };
        let req = view.request(&on_a, &image).unwrap();
        assert_eq!(view.place(&req), Ok(0));
        // An image no node holds keeps every node out.
        let nowhere = Image::default();
        let req = view.request(&instance, &nowhere).unwrap();
        assert_eq!(
            view.place(&req).unwrap_err().0,
            "no node can take the instance: 2 do not hold the image"
        );
    }
}

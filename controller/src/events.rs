//! The event bus: lifecycle and operation events of this controller, for `/1.0/events`.
//!
//! The state machine publishes, after each applied log entry, the events the command implies
//! (see [`derive`]): every controller applies the same log, so every controller publishes the
//! same events, and a subscriber may connect to any of them. The bus is in memory and bounded
//! ([`BUS_CAPACITY`]): a slow subscriber loses the oldest events (the controller logs how many), and
//! publishing never waits for anyone. Events are not stored: nothing is replayed after a
//! restart, a snapshot install publishes nothing, and entries applied while nobody listens
//! (the log replayed at startup, before the API serves) are dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use berth_proto::api::Operation;
use berth_proto::api::tenancy::{Event, LifecycleEvent};
use tokio::sync::broadcast;

use berth_proto::api::InstanceStatusCode;

use crate::state::{
    Action, ApplyResult, Command, DEFAULT_PROJECT, Requestor, Role, State, split_scoped_name,
};

/// How many events the bus holds for its slowest subscriber.
pub const BUS_CAPACITY: usize = 1024;

/// How many in-flight operations the bus remembers the requestor of (the key that asked for
/// a start, a stop, ... is named when the action ends).
const REMEMBERED_OPERATIONS: usize = 4096;

/// Who may receive an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Keys that see the event's project (every key of it, and fleet keys).
    Project,
    /// Admin and operator keys asking for all projects (nodes, cluster settings).
    Fleet,
    /// Admin keys asking for all projects (API keys).
    Admin,
}

/// An event with who may see it.
#[derive(Debug, Clone)]
pub struct Published {
    pub event: Event,
    pub audience: Audience,
}

/// The in-memory broadcast of this controller's events. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Published>>,
    /// Requestors of actions in flight, by operation id, oldest first.
    requestors: Arc<Mutex<Remembered>>,
}

#[derive(Debug, Default)]
struct Remembered {
    by_op: HashMap<String, Option<Requestor>>,
    order: VecDeque<String>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    pub fn new() -> EventBus {
        let (tx, _) = broadcast::channel(BUS_CAPACITY);
        EventBus {
            tx,
            requestors: Arc::default(),
        }
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    /// Publishes one event (dropped when nobody listens).
    pub fn publish(&self, published: Published) {
        let _ = self.tx.send(Arc::new(published));
    }

    /// Publishes what applying a command gave: `drafts` from [`derive`] (computed before the
    /// command was applied), `result` its outcome and `after` the state it left. Nothing is
    /// published for a rejected command.
    pub fn publish_applied(&self, drafts: Vec<Draft>, result: &ApplyResult, after: &State) {
        if result.is_err() || drafts.is_empty() {
            return;
        }
        let listening = self.tx.receiver_count() > 0;
        let now = crate::clock::now();
        let mut remembered = self.requestors.lock().unwrap_or_else(|p| p.into_inner());
        for draft in drafts {
            match draft {
                Draft::Remember { op, requestor } => remembered.insert(op, requestor),
                Draft::Forget { op } => {
                    remembered.take(&op);
                }
                Draft::Operation { id } => {
                    if let Some(op) = after.operations.get(&id).filter(|_| listening) {
                        self.publish(operation_event(op, &now));
                    }
                }
                Draft::Lifecycle(mut l) => {
                    if let Some(op) = &l.requestor_of {
                        l.requestor = remembered.get(op);
                    }
                    if listening {
                        self.publish(l.into_published(&now));
                    }
                }
            }
        }
    }
}

impl Remembered {
    fn insert(&mut self, op: String, requestor: Option<Requestor>) {
        if self.by_op.insert(op.clone(), requestor).is_none() {
            self.order.push_back(op);
        }
        while self.order.len() > REMEMBERED_OPERATIONS {
            if let Some(old) = self.order.pop_front() {
                self.by_op.remove(&old);
            }
        }
    }

    fn get(&self, op: &str) -> Option<Requestor> {
        self.by_op.get(op).cloned().flatten()
    }

    fn take(&mut self, op: &str) -> Option<Requestor> {
        let requestor = self.by_op.remove(op)?;
        self.order.retain(|o| o != op);
        requestor
    }
}

/// What a command implies, worked out before it is applied (the state it needs may go away).
#[derive(Debug, Clone, PartialEq)]
pub enum Draft {
    /// A lifecycle event.
    Lifecycle(LifecycleDraft),
    /// The operation `id` as it is after the command.
    Operation { id: String },
    /// The key that asked for the action of operation `op`, named when the action ends.
    Remember {
        op: String,
        requestor: Option<Requestor>,
    },
    /// The action of operation `op` ended: forget who asked.
    Forget { op: String },
}

/// A lifecycle event before publishing.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleDraft {
    pub audience: Audience,
    pub project: String,
    pub action: String,
    pub source: String,
    pub context: BTreeMap<String, String>,
    pub requestor: Option<Requestor>,
    /// Name the requestor remembered for this operation instead of `requestor`.
    pub requestor_of: Option<String>,
}

impl LifecycleDraft {
    fn into_published(self, now: &str) -> Published {
        let metadata = LifecycleEvent {
            action: self.action,
            source: self.source,
            context: self.context,
            requestor: self.requestor,
        };
        Published {
            event: Event {
                kind: "lifecycle".into(),
                timestamp: now.to_string(),
                location: String::new(),
                project: self.project,
                metadata: serde_json::to_value(metadata).unwrap_or_default(),
            },
            audience: self.audience,
        }
    }
}

fn operation_event(op: &Operation, now: &str) -> Published {
    Published {
        event: Event {
            kind: "operation".into(),
            timestamp: now.to_string(),
            location: String::new(),
            project: if op.project.is_empty() {
                DEFAULT_PROJECT.to_string()
            } else {
                op.project.clone()
            },
            metadata: serde_json::to_value(op).unwrap_or_default(),
        },
        audience: Audience::Project,
    }
}

/// `url` of an object of `project`: `?project=` is added outside the default project.
pub fn object_url(path: &str, project: &str) -> String {
    format!("{path}{}", crate::api::instances::project_suffix(project))
}

/// The events `cmd` implies when applied to `before` (call it before applying). Commands
/// answered from an idempotency record (a repeated write) imply none.
pub fn derive(before: &State, cmd: &Command) -> Vec<Draft> {
    if before.is_idempotent_replay(cmd) {
        return Vec::new();
    }
    let mut requestor = None;
    let mut inner = cmd;
    loop {
        match inner {
            Command::By {
                requestor: r,
                command,
                ..
            } => {
                requestor = Some(r.clone());
                inner = command;
            }
            Command::IfMatch { command, .. } => inner = command,
            _ => break,
        }
    }
    let mut out = Vec::new();
    let emit =
        |out: &mut Vec<Draft>, audience: Audience, project: &str, action: &str, source: String| {
            out.push(Draft::Lifecycle(LifecycleDraft {
                audience,
                project: project.to_string(),
                action: action.to_string(),
                source,
                context: BTreeMap::new(),
                requestor: requestor.clone(),
                requestor_of: None,
            }));
            out.len() - 1
        };
    let instance_url = |key: &str| {
        let (project, short) = split_scoped_name(key);
        object_url(&format!("/1.0/instances/{short}"), project)
    };
    let profile_url = |key: &str| {
        let (project, short) = split_scoped_name(key);
        object_url(&format!("/1.0/profiles/{short}"), project)
    };
    let instance_project = |key: &str| {
        before
            .instances
            .get(key)
            .map(|i| i.project.clone())
            .unwrap_or_else(|| split_scoped_name(key).0.to_string())
    };
    let mut old_name: Option<(usize, String)> = None;
    match inner {
        Command::CreateProject { project } => {
            emit(
                &mut out,
                Audience::Project,
                &project.name,
                "project-created",
                format!("/1.0/projects/{}", project.name),
            );
        }
        Command::UpdateProject { name, .. } => {
            emit(
                &mut out,
                Audience::Project,
                name,
                "project-updated",
                format!("/1.0/projects/{name}"),
            );
        }
        Command::RenameProject { from, to } => {
            let i = emit(
                &mut out,
                Audience::Project,
                to,
                "project-renamed",
                format!("/1.0/projects/{to}"),
            );
            old_name = Some((i, from.clone()));
        }
        Command::DeleteProject { name } => {
            emit(
                &mut out,
                Audience::Project,
                name,
                "project-deleted",
                format!("/1.0/projects/{name}"),
            );
        }
        Command::CreateProfile { profile } => {
            emit(
                &mut out,
                Audience::Project,
                &profile.project,
                "profile-created",
                profile_url(&profile.name),
            );
        }
        Command::UpdateProfile { name, .. } | Command::DeleteProfile { name } => {
            let action = if matches!(inner, Command::UpdateProfile { .. }) {
                "profile-updated"
            } else {
                "profile-deleted"
            };
            let project = before
                .profiles
                .get(name)
                .map(|p| p.project.clone())
                .unwrap_or_else(|| split_scoped_name(name).0.to_string());
            emit(
                &mut out,
                Audience::Project,
                &project,
                action,
                profile_url(name),
            );
        }
        Command::RenameProfile { from, to } => {
            let project = before
                .profiles
                .get(from)
                .map(|p| p.project.clone())
                .unwrap_or_else(|| split_scoped_name(from).0.to_string());
            let i = emit(
                &mut out,
                Audience::Project,
                &project,
                "profile-renamed",
                profile_url(to),
            );
            old_name = Some((i, split_scoped_name(from).1.to_string()));
        }
        Command::SetClusterConfig { .. } => {
            emit(
                &mut out,
                Audience::Fleet,
                "",
                "cluster-updated",
                "/1.0/cluster".into(),
            );
        }
        Command::JoinNode { node, .. } => {
            emit(
                &mut out,
                Audience::Fleet,
                "",
                "cluster-member-added",
                format!("/1.0/cluster/members/{}", node.name),
            );
        }
        Command::RemoveNode { name }
        | Command::SetNodeConfig { name, .. }
        | Command::SetNodeEvacuated { name, .. } => {
            let action = if matches!(inner, Command::RemoveNode { .. }) {
                "cluster-member-removed"
            } else {
                "cluster-member-updated"
            };
            emit(
                &mut out,
                Audience::Fleet,
                "",
                action,
                format!("/1.0/cluster/members/{name}"),
            );
        }
        Command::CreateInstance {
            instance,
            operation,
        } => {
            if let Some(op) = operation {
                out.push(Draft::Operation { id: op.id.clone() });
            }
            match &instance.pending {
                // Announced when the reconciler has made it.
                Some(p) => out.push(Draft::Remember {
                    op: p.op.clone(),
                    requestor: requestor.clone(),
                }),
                None => {
                    emit(
                        &mut out,
                        Audience::Project,
                        &instance.project,
                        "instance-created",
                        instance_url(&instance.name),
                    );
                }
            }
        }
        Command::UpdateInstance { name, .. } => {
            emit(
                &mut out,
                Audience::Project,
                &instance_project(name),
                "instance-updated",
                instance_url(name),
            );
        }
        Command::RenameInstance { from, to } => {
            let i = emit(
                &mut out,
                Audience::Project,
                &instance_project(from),
                "instance-renamed",
                instance_url(to),
            );
            old_name = Some((i, split_scoped_name(from).1.to_string()));
        }
        Command::SetInstanceAction { pending, .. } => {
            out.push(Draft::Remember {
                op: pending.op.clone(),
                requestor: requestor.clone(),
            });
            out.push(Draft::Operation {
                id: pending.op.clone(),
            });
        }
        Command::FinishAction {
            name, op, error, ..
        } => {
            let Some(inst) = before.instances.get(name) else {
                return out;
            };
            let Some(pending) = inst.pending.as_ref().filter(|p| &p.op == op) else {
                return out;
            };
            out.push(Draft::Operation { id: op.clone() });
            let actions: &[&str] = if !error.is_empty() {
                &[]
            } else {
                match pending.action {
                    Action::Create { start: true } => &["instance-created", "instance-started"],
                    Action::Create { start: false } => &["instance-created"],
                    Action::Start => &["instance-started"],
                    Action::Stop { .. } => &["instance-stopped"],
                    Action::Restart { .. } => &["instance-restarted"],
                    Action::Delete { .. } => &["instance-deleted"],
                    Action::Snapshot { .. } => &["instance-snapshot-created"],
                    Action::DeleteSnapshot { .. } => &["instance-snapshot-deleted"],
                    Action::RenameSnapshot { .. } => &["instance-snapshot-renamed"],
                    Action::Restore { .. } => &["instance-restored"],
                    Action::CopyFrom { start: true, .. } => {
                        &["instance-created", "instance-started"]
                    }
                    Action::CopyFrom { start: false, .. } => &["instance-created"],
                    Action::Migrate { .. } => &["instance-migrated"],
                }
            };
            for action in actions {
                out.push(Draft::Lifecycle(LifecycleDraft {
                    audience: Audience::Project,
                    project: inst.project.clone(),
                    action: (*action).to_string(),
                    source: instance_url(name),
                    context: BTreeMap::from([("operation".to_string(), op.clone())]),
                    requestor: None,
                    requestor_of: Some(op.clone()),
                }));
            }
            out.push(Draft::Forget { op: op.clone() });
        }
        Command::ObserveInstance {
            name,
            observed,
            based_on,
        } => {
            // Mirrors apply: an instance at rest that stopped by itself.
            if let Some(inst) = before.instances.get(name).filter(|i| {
                i.pending.is_none()
                    && &i.observed.updated_at == based_on
                    && i.observed.status == InstanceStatusCode::Running
                    && observed.status == InstanceStatusCode::Stopped
            }) {
                emit(
                    &mut out,
                    Audience::Project,
                    &inst.project,
                    "instance-shutdown",
                    instance_url(name),
                );
            }
        }
        Command::DeleteInstance { name } => {
            emit(
                &mut out,
                Audience::Project,
                &instance_project(name),
                "instance-deleted",
                instance_url(name),
            );
        }
        Command::PutImage { image } => {
            let old = before.images.get(&image.fingerprint);
            let action = if old.is_some() {
                "image-updated"
            } else {
                "image-created"
            };
            // The projects the command names are the importer's; the others that hold the
            // image hear of it without learning which key (of another project) did it.
            let mut own = image.projects.clone();
            if own.is_empty() {
                own.insert(DEFAULT_PROJECT.to_string());
            }
            let mut projects = own.clone();
            if let Some(old) = old {
                projects.extend(old.projects.iter().cloned());
            }
            for p in projects {
                out.push(Draft::Lifecycle(LifecycleDraft {
                    audience: Audience::Project,
                    project: p.clone(),
                    action: action.to_string(),
                    source: object_url(&format!("/1.0/images/{}", image.fingerprint), &p),
                    context: BTreeMap::new(),
                    requestor: requestor.clone().filter(|_| own.contains(&p)),
                    requestor_of: None,
                }));
            }
        }
        Command::UpdateImage { fingerprint, .. } => {
            let mut projects = before
                .images
                .get(fingerprint)
                .map(|i| i.projects.clone())
                .unwrap_or_default();
            if projects.is_empty() {
                projects.insert(DEFAULT_PROJECT.to_string());
            }
            for p in projects {
                out.push(Draft::Lifecycle(LifecycleDraft {
                    audience: Audience::Project,
                    project: p.clone(),
                    action: "image-updated".to_string(),
                    source: object_url(&format!("/1.0/images/{fingerprint}"), &p),
                    context: BTreeMap::new(),
                    requestor: requestor.clone(),
                    requestor_of: None,
                }));
            }
        }
        Command::DeleteImage { fingerprint } => {
            let mut projects = before
                .images
                .get(fingerprint)
                .map(|i| i.projects.clone())
                .unwrap_or_default();
            if projects.is_empty() {
                projects.insert(DEFAULT_PROJECT.to_string());
            }
            // The requestor is named only in its own key's project (fleet keys: the default
            // project's).
            let own = requestor
                .as_ref()
                .and_then(|r| before.api_keys.get(&r.key_id))
                .filter(|k| matches!(k.role, Role::Member | Role::Viewer))
                .map(|k| k.project.clone())
                .unwrap_or_else(|| DEFAULT_PROJECT.to_string());
            for p in projects {
                out.push(Draft::Lifecycle(LifecycleDraft {
                    audience: Audience::Project,
                    project: p.clone(),
                    action: "image-deleted".to_string(),
                    source: object_url(&format!("/1.0/images/{fingerprint}"), &p),
                    context: BTreeMap::new(),
                    requestor: requestor.clone().filter(|_| p == own),
                    requestor_of: None,
                }));
            }
        }
        Command::UnshareImage {
            fingerprint,
            project,
        } => {
            // Only the project that let go of it hears of it.
            out.push(Draft::Lifecycle(LifecycleDraft {
                audience: Audience::Project,
                project: project.clone(),
                action: "image-deleted".to_string(),
                source: object_url(&format!("/1.0/images/{fingerprint}"), project),
                context: BTreeMap::new(),
                requestor: requestor.clone(),
                requestor_of: None,
            }));
        }
        Command::PutAlias { alias } | Command::CreateAlias { alias } => {
            let action = if before.aliases.contains_key(&alias.name) {
                "image-alias-updated"
            } else {
                "image-alias-created"
            };
            emit(
                &mut out,
                Audience::Project,
                &alias.project,
                action,
                object_url(
                    &format!("/1.0/images/aliases/{}", alias.short_name()),
                    &alias.project,
                ),
            );
        }
        Command::DeleteAlias { name } => {
            if let Some(alias) = before.aliases.get(name) {
                emit(
                    &mut out,
                    Audience::Project,
                    &alias.project,
                    "image-alias-deleted",
                    object_url(
                        &format!("/1.0/images/aliases/{}", alias.short_name()),
                        &alias.project,
                    ),
                );
            }
        }
        Command::PutOperation { operation } => {
            out.push(Draft::Operation {
                id: operation.id.clone(),
            });
        }
        Command::Record {
            project,
            action,
            source,
            context,
        } => {
            let i = emit(&mut out, Audience::Project, project, action, source.clone());
            if let Some(Draft::Lifecycle(l)) = out.get_mut(i) {
                l.context.clone_from(context);
            }
        }
        Command::AddApiKey { key } => {
            emit(
                &mut out,
                Audience::Admin,
                "",
                "api-key-created",
                format!("/1.0/keys/{}", key.name),
            );
        }
        Command::DeleteApiKey { id, .. } | Command::RotateApiKey { id, .. } => {
            let action = if matches!(inner, Command::DeleteApiKey { .. }) {
                "api-key-revoked"
            } else {
                "api-key-rotated"
            };
            let name = before
                .api_keys
                .get(id)
                .map_or_else(|| id.clone(), |k| k.name.clone());
            emit(
                &mut out,
                Audience::Admin,
                "",
                action,
                format!("/1.0/keys/{name}"),
            );
        }
        Command::By { .. }
        | Command::IfMatch { .. }
        | Command::Bootstrap { .. }
        | Command::AddJoinToken { .. }
        | Command::SetNodeStatus { .. }
        | Command::RegisterController { .. }
        | Command::JoinController { .. }
        | Command::RemoveController { .. }
        | Command::UpdateNodeCapacity { .. }
        | Command::SetDesiredState { .. }
        | Command::SwitchNode { .. }
        | Command::SetEvacuation { .. }
        | Command::SetImageLocation { .. }
        | Command::DeleteOperations { .. }
        | Command::CompleteIdempotency { .. }
        | Command::PruneIdempotency { .. } => {}
    }
    if let Some((i, old)) = old_name
        && let Some(Draft::Lifecycle(l)) = out.get_mut(i)
    {
        l.context.insert("old_name".into(), old);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use berth_proto::api::OperationStatus;

    use super::*;
    use crate::state::{ApiKey, IdempotencyTag, Image, Instance, PendingAction};

    fn alice() -> Requestor {
        Requestor {
            key: "alice".into(),
            key_id: "a1".into(),
            role: "member".into(),
        }
    }

    fn by(command: Command) -> Command {
        Command::By {
            requestor: alice(),
            idempotency: None,
            command: Box::new(command),
        }
    }

    fn state() -> State {
        let mut s = State::default();
        s.instances.insert(
            "p_web".into(),
            Instance {
                name: "p_web".into(),
                project: "p".into(),
                ..Default::default()
            },
        );
        s
    }

    /// Applies `cmd` to `s` and publishes its events on `bus`.
    fn run(bus: &EventBus, s: &mut State, cmd: Command) -> ApplyResult {
        let drafts = derive(s, &cmd);
        let result = s.apply(cmd);
        bus.publish_applied(drafts, &result, s);
        result
    }

    fn drain(rx: &mut broadcast::Receiver<Arc<Published>>) -> Vec<Arc<Published>> {
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            out.push(p);
        }
        out
    }

    fn action(op: &str) -> Command {
        Command::SetInstanceAction {
            name: "p_web".into(),
            pending: PendingAction {
                op: op.into(),
                action: Action::Start,
                since: String::new(),
            },
            desired: None,
            operation: Operation {
                project: "p".into(),
                status: OperationStatus::Running,
                ..Default::default()
            },
            now: String::new(),
        }
    }

    fn finish(op: &str, error: &str) -> Command {
        Command::FinishAction {
            name: "p_web".into(),
            op: op.into(),
            observed: None,
            error: error.into(),
            now: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn an_action_is_announced_when_it_ends_naming_who_asked() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let mut s = state();
        run(&bus, &mut s, by(action("op1"))).unwrap();
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event.kind, "operation");
        assert_eq!(got[0].event.project, "p");
        assert_eq!(got[0].event.metadata["id"], "op1");
        // The reconciler ends it: a system command, yet the event names alice.
        run(&bus, &mut s, finish("op1", "")).unwrap();
        let got = drain(&mut rx);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].event.kind, "operation");
        assert_eq!(got[0].event.metadata["status"], "Success");
        let l = &got[1].event;
        assert_eq!(l.kind, "lifecycle");
        assert_eq!(l.project, "p");
        assert_eq!(l.metadata["action"], "instance-started");
        assert_eq!(l.metadata["source"], "/1.0/instances/web?project=p");
        assert_eq!(l.metadata["requestor"]["key"], "alice");
        assert_eq!(got[1].audience, Audience::Project);
        // Stale: nothing.
        run(&bus, &mut s, finish("op1", "")).unwrap();
        assert!(drain(&mut rx).is_empty());
        // A failed action: the operation only, and who asked is forgotten.
        run(&bus, &mut s, by(action("op2"))).unwrap();
        drain(&mut rx);
        run(&bus, &mut s, finish("op2", "boom")).unwrap();
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event.metadata["status"], "Failure");
        assert!(bus.requestors.lock().unwrap().by_op.is_empty());
    }

    #[test]
    fn create_and_start_name_the_requestor_twice() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let mut s = State::default();
        s.images.insert(
            "f".into(),
            Image {
                fingerprint: "f".into(),
                ..Default::default()
            },
        );
        let inst = Instance {
            name: "web".into(),
            image: "f".into(),
            pending: Some(PendingAction {
                op: "op1".into(),
                action: Action::Create { start: true },
                since: String::new(),
            }),
            ..Default::default()
        };
        let drafts = derive(
            &s,
            &by(Command::CreateInstance {
                instance: inst.clone(),
                operation: None,
            }),
        );
        assert_eq!(
            drafts,
            vec![Draft::Remember {
                op: "op1".into(),
                requestor: Some(alice())
            }]
        );
        // Placement needs nodes; put the instance in directly and publish what apply would.
        s.instances.insert("web".into(), inst);
        bus.publish_applied(drafts, &Ok(crate::state::ApplyOk::Done), &s);
        run(&bus, &mut s, finish_named("web", "op1")).unwrap();
        let got = drain(&mut rx);
        let actions: Vec<_> = got
            .iter()
            .map(|p| {
                (
                    p.event.metadata["action"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    p.event.metadata["requestor"]["key"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect();
        assert_eq!(
            actions,
            vec![
                ("instance-created".into(), "alice".into()),
                ("instance-started".into(), "alice".into())
            ]
        );
        assert_eq!(got[0].event.metadata["source"], "/1.0/instances/web");
        assert_eq!(got[0].event.project, "default");
    }

    fn finish_named(name: &str, op: &str) -> Command {
        Command::FinishAction {
            name: name.into(),
            op: op.into(),
            observed: None,
            error: String::new(),
            now: String::new(),
        }
    }

    #[test]
    fn rejected_and_repeated_commands_publish_nothing() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let mut s = state();
        assert!(
            run(
                &bus,
                &mut s,
                by(Command::DeleteInstance {
                    name: "nope".into()
                })
            )
            .is_err()
        );
        assert!(drain(&mut rx).is_empty());
        let tagged = Command::By {
            requestor: alice(),
            idempotency: Some(IdempotencyTag {
                key: "a1/x".into(),
                request_hash: "h".into(),
                seq: 0,
                now: String::new(),
            }),
            command: Box::new(Command::DeleteInstance {
                name: "p_web".into(),
            }),
        };
        run(&bus, &mut s, tagged.clone()).unwrap();
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event.metadata["action"], "instance-deleted");
        assert!(derive(&s, &tagged).is_empty());
        run(&bus, &mut s, tagged).unwrap();
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn shared_image_events_name_the_requestor_in_its_own_project_only() {
        let mut s = state();
        s.api_keys.insert(
            "a1".into(),
            ApiKey {
                id: "a1".into(),
                name: "alice".into(),
                role: Role::Member,
                project: "p".into(),
                ..Default::default()
            },
        );
        s.images.insert(
            "f".into(),
            Image {
                fingerprint: "f".into(),
                projects: ["q".to_string(), "r".to_string()].into(),
                ..Default::default()
            },
        );
        let lifecycle = |s: &State, cmd: Command| -> Vec<(String, Option<Requestor>)> {
            derive(s, &cmd)
                .into_iter()
                .filter_map(|d| match d {
                    Draft::Lifecycle(l) => Some((l.project, l.requestor)),
                    _ => None,
                })
                .collect()
        };
        let put = lifecycle(
            &s,
            by(Command::PutImage {
                image: Image {
                    fingerprint: "f".into(),
                    projects: ["p".to_string()].into(),
                    ..Default::default()
                },
            }),
        );
        assert_eq!(
            put,
            vec![
                ("p".to_string(), Some(alice())),
                ("q".to_string(), None),
                ("r".to_string(), None)
            ]
        );
        s.images.get_mut("f").unwrap().projects.insert("p".into());
        let del = lifecycle(
            &s,
            by(Command::DeleteImage {
                fingerprint: "f".into(),
            }),
        );
        assert_eq!(
            del,
            vec![
                ("p".to_string(), Some(alice())),
                ("q".to_string(), None),
                ("r".to_string(), None)
            ]
        );
    }

    #[test]
    fn records_are_lifecycle_events_of_their_project() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        let mut s = state();
        let before = s.clone();
        let cmd = by(Command::Record {
            project: "p".into(),
            action: "instance-file-pushed".into(),
            source: "/1.0/instances/web?project=p".into(),
            context: BTreeMap::from([("path".into(), "/etc/motd".into())]),
        });
        run(&bus, &mut s, cmd).unwrap();
        assert_eq!(s, before, "a record changes nothing");
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].audience, Audience::Project);
        assert_eq!(got[0].event.project, "p");
        let m = &got[0].event.metadata;
        assert_eq!(m["action"], "instance-file-pushed");
        assert_eq!(m["source"], "/1.0/instances/web?project=p");
        assert_eq!(m["context"]["path"], "/etc/motd");
        assert_eq!(m["requestor"]["key"], alice().key);
    }

    #[test]
    fn audiences_sources_and_old_names() {
        let mut s = state();
        s.api_keys.insert(
            "a1".into(),
            ApiKey {
                id: "a1".into(),
                name: "alice".into(),
                role: Role::Member,
                project: "p".into(),
                ..Default::default()
            },
        );
        let one = |cmd: Command| match derive(&s, &cmd).pop() {
            Some(Draft::Lifecycle(l)) => l,
            other => panic!("{other:?}"),
        };
        let l = one(Command::DeleteApiKey {
            id: "a1".into(),
            now: String::new(),
        });
        assert_eq!(
            (
                l.audience,
                l.action.as_str(),
                l.source.as_str(),
                l.project.as_str()
            ),
            (Audience::Admin, "api-key-revoked", "/1.0/keys/alice", "")
        );
        let l = one(by(Command::RenameInstance {
            from: "p_web".into(),
            to: "p_www".into(),
        }));
        assert_eq!(l.action, "instance-renamed");
        assert_eq!(l.source, "/1.0/instances/www?project=p");
        assert_eq!(l.context["old_name"], "web");
        assert_eq!(l.requestor, Some(alice()));
        let l = one(Command::SetClusterConfig {
            changes: Default::default(),
        });
        assert_eq!(
            (l.audience, l.action.as_str()),
            (Audience::Fleet, "cluster-updated")
        );
        let drafts = derive(
            &s,
            &Command::PutImage {
                image: Image {
                    fingerprint: "f".into(),
                    projects: ["p".to_string(), "q".to_string()].into(),
                    ..Default::default()
                },
            },
        );
        let sources: Vec<_> = drafts
            .iter()
            .map(|d| match d {
                Draft::Lifecycle(l) => (l.project.clone(), l.source.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sources,
            vec![
                ("p".into(), "/1.0/images/f?project=p".into()),
                ("q".into(), "/1.0/images/f?project=q".into())
            ]
        );
    }

    #[test]
    fn nothing_is_built_without_subscribers_but_requestors_are_kept() {
        let bus = EventBus::new();
        let mut s = state();
        run(&bus, &mut s, by(action("op1"))).unwrap();
        assert_eq!(bus.requestors.lock().unwrap().get("op1"), Some(alice()));
        let mut rx = bus.subscribe();
        run(&bus, &mut s, finish("op1", "")).unwrap();
        let got = drain(&mut rx);
        assert_eq!(got[1].event.metadata["requestor"]["key"], "alice");
    }

    #[test]
    fn remembered_requestors_are_bounded() {
        let mut r = Remembered::default();
        for n in 0..REMEMBERED_OPERATIONS + 10 {
            r.insert(format!("op{n}"), Some(alice()));
        }
        assert_eq!(r.by_op.len(), REMEMBERED_OPERATIONS);
        assert!(r.get("op0").is_none());
        assert_eq!(r.take("op20"), Some(alice()));
        assert_eq!(r.order.len(), REMEMBERED_OPERATIONS - 1);
    }
}

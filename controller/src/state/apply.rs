//! The deterministic state transition: `State::apply(Command)`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use berth_proto::api::{InstanceStatusCode, OperationStatus};

use super::command::{ApplyError, ApplyOk, ApplyResult, Command, IdempotencyTag};
use super::keys::ObjectKey;
use super::model::{
    Action, ClusterInfo, ControllerRecord, DEFAULT_PROFILE, DEFAULT_PROJECT, DesiredState,
    IdempotencyRecord, Instance, JoinKind, JoinTokenRecord, NodeStatus, PendingAction, Profile,
    Project, Snapshot, State, StoredResponse, alias_key, scoped_name, split_scoped_name,
};
use super::tenancy::Change;
use super::time::Rfc3339;

impl State {
    /// Applies one command. Deterministic (no clock, no randomness, no I/O); on error the state
    /// is left unchanged.
    pub fn apply(&mut self, cmd: Command) -> ApplyResult {
        match cmd {
            Command::By {
                idempotency: None,
                command,
                ..
            } => self.apply(*command),
            Command::By {
                idempotency: Some(tag),
                command,
                ..
            } => self.apply_tagged(tag, *command),
            Command::CompleteIdempotency {
                key,
                request_hash,
                status,
                body,
                etag,
                now,
            } => {
                let record = self
                    .idempotency
                    .entry(key)
                    .or_insert_with(|| IdempotencyRecord {
                        request_hash: request_hash.clone(),
                        created_at: now,
                        results: Default::default(),
                        response: None,
                    });
                if record.request_hash != request_hash {
                    return Err(key_reused());
                }
                if record.response.is_none() {
                    record.response = Some(StoredResponse { status, body, etag });
                }
                Ok(ApplyOk::Done)
            }
            Command::PruneIdempotency { before } => {
                self.idempotency
                    .retain(|_, r| r.created_at.as_str() >= before.as_str());
                Ok(ApplyOk::Done)
            }
            // A repeated write is answered from its record, whatever the ETags are now (its
            // first application may be what changed them).
            Command::IfMatch { command, .. } if self.is_idempotent_replay(&command) => {
                self.apply(*command)
            }
            Command::IfMatch { expect, command } => {
                for (key, etag) in &expect {
                    match self.etag(key) {
                        Some(current) if &current == etag => {}
                        Some(_) => {
                            return Err(ApplyError::precondition_failed(format!(
                                "{} changed since it was read (its ETag no longer matches If-Match)",
                                describe(key)
                            )));
                        }
                        None => {
                            return Err(ApplyError::not_found(format!(
                                "{} not found",
                                describe(key)
                            )));
                        }
                    }
                }
                self.apply(*command)
            }
            cmd @ (Command::CreateProject { .. }
            | Command::UpdateProject { .. }
            | Command::RenameProject { .. }
            | Command::DeleteProject { .. }
            | Command::CreateProfile { .. }
            | Command::UpdateProfile { .. }
            | Command::RenameProfile { .. }
            | Command::DeleteProfile { .. }) => self.apply_tenancy(cmd),
            Command::Bootstrap {
                name,
                ca_cert_pem,
                ca_key_pem,
                admin_key,
                now,
            } => {
                if self.cluster.bootstrapped {
                    return Err(ApplyError::conflict("the cluster is already bootstrapped"));
                }
                self.check_new_api_key(&admin_key.id, &admin_key.hash)?;
                self.cluster = ClusterInfo {
                    bootstrapped: true,
                    name,
                    ca_cert_pem,
                    ca_key_pem,
                    created_at: now,
                    config: Default::default(),
                    next_controller_id: 0,
                    removed_controllers: Default::default(),
                };
                self.api_keys.insert(admin_key.id.clone(), admin_key);
                self.projects
                    .entry(DEFAULT_PROJECT.to_string())
                    .or_insert_with(|| Project {
                        name: DEFAULT_PROJECT.to_string(),
                        description: "Default project".into(),
                        config: Default::default(),
                        created_at: self.cluster.created_at.clone(),
                    });
                self.profiles
                    .entry(DEFAULT_PROFILE.to_string())
                    .or_insert_with(|| Profile {
                        name: DEFAULT_PROFILE.to_string(),
                        project: DEFAULT_PROJECT.to_string(),
                        description: "Default profile".into(),
                        config: Default::default(),
                    });
                Ok(ApplyOk::Done)
            }
            Command::SetClusterConfig { changes } => {
                for (k, v) in changes {
                    match v {
                        Some(v) => self.cluster.config.insert(k, v),
                        None => self.cluster.config.remove(&k),
                    };
                }
                Ok(ApplyOk::Done)
            }
            Command::AddJoinToken { hash, record } => {
                if self.join_tokens.contains_key(&hash) {
                    return Err(ApplyError::conflict(
                        "a join token with this secret already exists",
                    ));
                }
                self.join_tokens.insert(hash, record);
                Ok(ApplyOk::Done)
            }
            Command::JoinNode {
                token_hash,
                node,
                now,
            } => {
                self.check_join_token(&token_hash, JoinKind::Node, &node.name, &now)?;
                if self.controllers.contains_key(&node.name) {
                    return Err(ApplyError::conflict(format!(
                        "{:?} is already the name of a controller",
                        node.name
                    )));
                }
                if self.nodes.contains_key(&node.name) {
                    return Err(ApplyError::conflict(format!(
                        "node {:?} already exists",
                        node.name
                    )));
                }
                if !node.ipv4_cidr.is_empty() {
                    parse_cidr(&node.ipv4_cidr)?;
                }
                self.join_tokens.remove(&token_hash);
                self.nodes.insert(node.name.clone(), node);
                Ok(ApplyOk::Done)
            }
            Command::SetNodeStatus { name, status } => {
                let node = self
                    .nodes
                    .get_mut(&name)
                    .ok_or_else(|| ApplyError::not_found(format!("node {name:?} not found")))?;
                node.status = status;
                Ok(ApplyOk::Done)
            }
            Command::RegisterController { record } => {
                match self.controllers.get(&record.name) {
                    Some(old) if old.id != record.id => {
                        return Err(ApplyError::conflict(format!(
                            "controller {:?} has raft id {}, not {}",
                            record.name, old.id, record.id
                        )));
                    }
                    Some(_) => {}
                    None if self.controllers.is_empty() => {}
                    None => {
                        return Err(ApplyError::invalid(format!(
                            "controller {:?} is not a member of this cluster (it was removed); \
                             join it again with a new token",
                            record.name
                        )));
                    }
                }
                if let Some(other) = self
                    .controllers
                    .values()
                    .find(|c| c.id == record.id && c.name != record.name)
                {
                    return Err(ApplyError::conflict(format!(
                        "raft id {} already belongs to controller {:?}",
                        record.id, other.name
                    )));
                }
                self.cluster.next_controller_id =
                    self.cluster.next_controller_id.max(record.id + 1);
                self.controllers.insert(record.name.clone(), record);
                Ok(ApplyOk::Done)
            }
            Command::JoinController {
                token_hash,
                name,
                peer_address,
                api_address,
                cert_fingerprint,
                now,
            } => {
                self.check_join_token(&token_hash, JoinKind::Controller, &name, &now)?;
                if self.nodes.contains_key(&name) {
                    return Err(ApplyError::conflict(format!(
                        "{name:?} is already the name of a node"
                    )));
                }
                if self.controllers.contains_key(&name) {
                    return Err(ApplyError::conflict(format!(
                        "controller {name:?} already exists"
                    )));
                }
                if let Some(other) = self
                    .controllers
                    .values()
                    .find(|c| c.peer_address == peer_address)
                {
                    return Err(ApplyError::conflict(format!(
                        "controller {:?} already uses peer address {peer_address}",
                        other.name
                    )));
                }
                let id = (self.controllers.values().map(|c| c.id).max().unwrap_or(0) + 1)
                    .max(self.cluster.next_controller_id);
                self.cluster.next_controller_id = id + 1;
                self.join_tokens.remove(&token_hash);
                self.controllers.insert(
                    name.clone(),
                    ControllerRecord {
                        name,
                        id,
                        peer_address,
                        api_address,
                        joined_at: now,
                        cert_fingerprint,
                    },
                );
                Ok(ApplyOk::ControllerId(id))
            }
            Command::RemoveController { name } => {
                let record = self.controllers.remove(&name).ok_or_else(|| {
                    ApplyError::not_found(format!("controller {name:?} not found"))
                })?;
                if !record.cert_fingerprint.is_empty() {
                    self.cluster
                        .removed_controllers
                        .insert(record.cert_fingerprint.to_ascii_lowercase());
                }
                Ok(ApplyOk::Done)
            }
            Command::RemoveNode { name } => {
                if !self.nodes.contains_key(&name) {
                    return Err(ApplyError::not_found(format!("node {name:?} not found")));
                }
                let count = self.instances.values().filter(|i| i.node == name).count();
                if count > 0 {
                    return Err(ApplyError::conflict(format!(
                        "node {name:?} still has {count} instances; move or delete them first"
                    )));
                }
                self.nodes.remove(&name);
                Ok(ApplyOk::Done)
            }
            Command::SetNodeConfig { name, changes } => {
                let node = self
                    .nodes
                    .get_mut(&name)
                    .ok_or_else(|| ApplyError::not_found(format!("node {name:?} not found")))?;
                for (k, v) in changes {
                    match v {
                        Some(v) => node.config.insert(k, v),
                        None => node.config.remove(&k),
                    };
                }
                Ok(ApplyOk::Done)
            }
            Command::UpdateNodeCapacity { name, capacity } => {
                let node = self
                    .nodes
                    .get_mut(&name)
                    .ok_or_else(|| ApplyError::not_found(format!("node {name:?} not found")))?;
                node.cpus = capacity.cpus;
                node.memory_bytes = capacity.memory_bytes;
                node.storage_total_bytes = capacity.storage_total_bytes;
                node.storage_free_bytes = capacity.storage_free_bytes;
                node.architecture = capacity.architecture;
                node.labels = capacity.labels;
                Ok(ApplyOk::Done)
            }
            Command::SetInstanceAction {
                name,
                pending,
                desired,
                mut operation,
                now,
            } => {
                self.check_action(&name, &pending.action)?;
                let inst = self.instance_mut(&name)?;
                operation.id.clone_from(&pending.op);
                inst.pending = Some(pending);
                if let Some(desired) = desired {
                    inst.desired = desired;
                    if desired == DesiredState::Running {
                        inst.last_used_at = now;
                    }
                }
                self.operations.insert(operation.id.clone(), operation);
                Ok(ApplyOk::Done)
            }
            Command::FinishAction {
                name,
                op,
                observed,
                error,
                now,
            } => {
                // A finished copy of a whole instance holds the source's snapshots now.
                let copied_snapshots =
                    match self.instances.get(&name).and_then(|i| i.pending.as_ref()) {
                        Some(PendingAction {
                            op: o,
                            action:
                                Action::CopyFrom {
                                    source,
                                    snapshot,
                                    instance_only: false,
                                    ..
                                },
                            ..
                        }) if *o == op && snapshot.is_empty() && error.is_empty() => {
                            self.instances.get(source).map(|src| src.snapshots.clone())
                        }
                        _ => None,
                    };
                let Some(inst) = self.instances.get_mut(&name) else {
                    return Ok(ApplyOk::Done);
                };
                let Some(pending) = inst.pending.as_ref().filter(|p| p.op == op) else {
                    return Ok(ApplyOk::Done);
                };
                let action = pending.action.clone();
                if let Some(snapshots) = copied_snapshots {
                    for (k, v) in snapshots {
                        inst.snapshots.entry(k).or_insert(v);
                    }
                }
                inst.pending = None;
                if let Some(mut observed) = observed {
                    if !error.is_empty() && observed.error.is_empty() {
                        observed.error.clone_from(&error);
                    }
                    inst.observed = observed;
                }
                let ok = error.is_empty();
                match &action {
                    Action::Snapshot {
                        name: snap,
                        expires_at,
                        scheduled,
                        due,
                    } => {
                        if *scheduled {
                            // Also after a failure: the next due time is the schedule's next turn.
                            inst.last_scheduled_snapshot.clone_from(due);
                        }
                        if ok {
                            inst.snapshots.insert(
                                snap.clone(),
                                Snapshot {
                                    name: snap.clone(),
                                    created_at: now.clone(),
                                    expires_at: expires_at.clone(),
                                    scheduled: *scheduled,
                                },
                            );
                        }
                    }
                    Action::DeleteSnapshot { name: snap } if ok => {
                        inst.snapshots.remove(snap);
                    }
                    Action::RenameSnapshot { from, to } if ok => {
                        if let Some(mut snap) = inst.snapshots.remove(from) {
                            snap.name.clone_from(to);
                            inst.snapshots.insert(to.clone(), snap);
                        }
                    }
                    _ => {}
                }
                let remove = match action {
                    Action::Delete { .. } => ok,
                    Action::Create { .. } | Action::CopyFrom { refresh: false, .. } => {
                        !ok && inst.observed.status == InstanceStatusCode::Pending
                    }
                    _ => false,
                };
                if remove {
                    self.instances.remove(&name);
                }
                if let Some(operation) = self.operations.get_mut(&op) {
                    operation.status = if error.is_empty() {
                        OperationStatus::Success
                    } else {
                        OperationStatus::Failure
                    };
                    operation.status_code = operation.status.code();
                    operation.err = error;
                    operation.updated_at = now;
                }
                Ok(ApplyOk::Done)
            }
            Command::CreateInstance {
                mut instance,
                operation,
            } => {
                if !self.project_exists(&instance.project) {
                    return Err(ApplyError::not_found(format!(
                        "project {:?} not found",
                        instance.project
                    )));
                }
                if scoped_name(&instance.project, split_scoped_name(&instance.name).1)
                    != instance.name
                {
                    return Err(ApplyError::invalid(format!(
                        "instance key {:?} does not belong to project {:?}",
                        instance.name, instance.project
                    )));
                }
                if self.instances.contains_key(&instance.name) {
                    return Err(ApplyError::conflict(format!(
                        "instance {:?} already exists",
                        split_scoped_name(&instance.name).1
                    )));
                }
                let copy_of = match &instance.pending {
                    Some(PendingAction {
                        action:
                            Action::CopyFrom {
                                source, snapshot, ..
                            },
                        ..
                    }) => Some((source.clone(), snapshot.clone())),
                    _ => None,
                };
                if let Some((source, snapshot)) = &copy_of {
                    let src = self.instances.get(source).ok_or_else(|| {
                        ApplyError::not_found(format!(
                            "instance {:?} not found",
                            split_scoped_name(source).1
                        ))
                    })?;
                    if src.project != instance.project {
                        return Err(ApplyError::invalid(
                            "an instance cannot be copied into another project",
                        ));
                    }
                    if !snapshot.is_empty() && !src.snapshots.contains_key(snapshot) {
                        return Err(ApplyError::not_found(format!(
                            "instance {:?} has no snapshot {snapshot:?}",
                            split_scoped_name(source).1
                        )));
                    }
                }
                // A copy keeps its source's image record even when that image was deleted since.
                if copy_of.is_none() && !self.images.contains_key(&instance.image) {
                    return Err(ApplyError::not_found(format!(
                        "image {:?} not found",
                        instance.image
                    )));
                }
                self.check_profiles(&instance.project, &instance.profiles)?;
                self.check_project_change(
                    &instance.project,
                    &Change {
                        instances: vec![(instance.name.as_str(), Some(&instance))],
                        profile: None,
                    },
                )?;
                instance.node = crate::scheduler::place_instance(self, &instance)
                    .map_err(|e| ApplyError::invalid(e.to_string()))?;
                instance.ipv4 = self
                    .allocate_ipv4(&instance.node)?
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                instance.address_node.clone_from(&instance.node);
                if let Some(op) = operation {
                    self.operations.insert(op.id.clone(), op);
                }
                if let Some(image) = self.images.get_mut(&instance.image)
                    && image.last_used_at < instance.created_at
                {
                    image.last_used_at.clone_from(&instance.created_at);
                }
                self.instances
                    .insert(instance.name.clone(), instance.clone());
                Ok(ApplyOk::Instance(instance))
            }
            Command::UpdateInstance {
                name,
                config,
                description,
                profiles,
                now: _,
            } => {
                let mut candidate = self.instance_mut(&name)?.clone();
                candidate.config = config;
                candidate.description = description;
                if let Some(profiles) = profiles {
                    self.check_profiles(&candidate.project, &profiles)?;
                    candidate.profiles = profiles;
                }
                self.check_project_change(
                    &candidate.project,
                    &Change {
                        instances: vec![(name.as_str(), Some(&candidate))],
                        profile: None,
                    },
                )?;
                self.instances.insert(name, candidate);
                Ok(ApplyOk::Done)
            }
            Command::SwitchNode { name, op, node } => {
                let Some(inst) = self.instances.get_mut(&name) else {
                    return Ok(ApplyOk::Done);
                };
                let moving = matches!(
                    &inst.pending,
                    Some(PendingAction { op: o, action: Action::Migrate { to, .. }, .. })
                        if *o == op && *to == node
                );
                if moving {
                    // Records made before addresses remembered their subnet: it is the node
                    // the instance leaves.
                    if inst.address_node.is_empty() {
                        inst.address_node.clone_from(&inst.node);
                    }
                    inst.node = node;
                }
                Ok(ApplyOk::Done)
            }
            Command::SetNodeEvacuated { name, evacuated } => {
                let node = self
                    .nodes
                    .get_mut(&name)
                    .ok_or_else(|| ApplyError::not_found(format!("node {name:?} not found")))?;
                node.evacuated = evacuated;
                Ok(ApplyOk::Done)
            }
            Command::SetEvacuation { name, evacuation } => {
                self.instance_mut(&name)?.evacuated_from = evacuation;
                Ok(ApplyOk::Done)
            }
            Command::RenameInstance { from, to } => {
                let Some(inst) = self.instances.get(&from) else {
                    return Err(ApplyError::not_found(format!(
                        "instance {:?} not found",
                        split_scoped_name(&from).1
                    )));
                };
                if split_scoped_name(&to).0 != split_scoped_name(&inst.name).0 {
                    return Err(ApplyError::invalid(
                        "an instance cannot be renamed into another project",
                    ));
                }
                if self.instances.contains_key(&to) {
                    return Err(ApplyError::conflict(format!(
                        "instance {:?} already exists",
                        split_scoped_name(&to).1
                    )));
                }
                if let Some(mut inst) = self.instances.remove(&from) {
                    inst.name = to.clone();
                    self.instances.insert(to, inst);
                }
                Ok(ApplyOk::Done)
            }
            Command::SetDesiredState { name, desired, now } => {
                let inst = self.instance_mut(&name)?;
                inst.desired = desired;
                if desired == DesiredState::Running {
                    inst.last_used_at = now;
                }
                Ok(ApplyOk::Done)
            }
            Command::ObserveInstance {
                name,
                observed,
                based_on,
            } => {
                if let Some(inst) = self
                    .instances
                    .get_mut(&name)
                    .filter(|i| i.pending.is_none() && i.observed.updated_at == based_on)
                {
                    if inst.pending.is_none()
                        && inst.observed.status == InstanceStatusCode::Running
                        && observed.status == InstanceStatusCode::Stopped
                    {
                        inst.desired = DesiredState::Stopped;
                    }
                    inst.observed = observed;
                }
                Ok(ApplyOk::Done)
            }
            Command::DeleteInstance { name } => {
                self.instances
                    .remove(&name)
                    .ok_or_else(|| ApplyError::not_found(format!("instance {name:?} not found")))?;
                Ok(ApplyOk::Done)
            }
            Command::PutImage { mut image } => {
                if let Some(old) = self.images.get(&image.fingerprint) {
                    image.locations.extend(old.locations.iter().cloned());
                    image.projects.extend(old.projects.iter().cloned());
                    image.origins.extend(old.origins.iter().cloned());
                    if old.last_used_at > image.last_used_at {
                        image.last_used_at.clone_from(&old.last_used_at);
                    }
                    image.public |= old.public;
                }
                self.images.insert(image.fingerprint.clone(), image);
                Ok(ApplyOk::Done)
            }
            Command::UpdateImage {
                fingerprint,
                properties,
                public,
            } => {
                let image = self.images.get_mut(&fingerprint).ok_or_else(|| {
                    ApplyError::not_found(format!("image {fingerprint:?} not found"))
                })?;
                image.properties = properties;
                image.public = public;
                Ok(ApplyOk::Done)
            }
            Command::SetImageLocation {
                fingerprint,
                node,
                present,
            } => {
                let image = self.images.get_mut(&fingerprint).ok_or_else(|| {
                    ApplyError::not_found(format!("image {fingerprint:?} not found"))
                })?;
                if present {
                    if !self.nodes.contains_key(&node) {
                        return Err(ApplyError::not_found(format!("node {node:?} not found")));
                    }
                    image.locations.insert(node);
                } else if image.locations.len() == 1 && image.locations.contains(&node) {
                    return Err(ApplyError::conflict(format!(
                        "node {node:?} holds the last copy of image {fingerprint:?}"
                    )));
                } else {
                    image.locations.remove(&node);
                }
                Ok(ApplyOk::Done)
            }
            Command::DeleteImage { fingerprint } => {
                if self.images.remove(&fingerprint).is_none() {
                    return Err(ApplyError::not_found(format!(
                        "image {fingerprint:?} not found"
                    )));
                }
                self.aliases.retain(|_, a| a.target != fingerprint);
                Ok(ApplyOk::Done)
            }
            Command::CreateAlias { alias } => {
                if self.aliases.contains_key(&alias.name) {
                    return Err(ApplyError::conflict(format!(
                        "image alias {:?} already exists",
                        alias.short_name()
                    )));
                }
                self.apply(Command::PutAlias { alias })
            }
            Command::UnshareImage {
                fingerprint,
                project,
            } => {
                let not_found =
                    || ApplyError::not_found(format!("image {fingerprint:?} not found"));
                let image = self.images.get_mut(&fingerprint).ok_or_else(not_found)?;
                if !image.projects.contains(&project) {
                    return Err(not_found());
                }
                // An empty list means shared with everyone: never unshare down to it.
                if image.projects.len() < 2 {
                    return Err(ApplyError::invalid(format!(
                        "image {fingerprint:?} is held by project {project:?} alone: delete it instead"
                    )));
                }
                image.projects.remove(&project);
                self.aliases
                    .retain(|_, a| !(a.target == fingerprint && a.project == project));
                Ok(ApplyOk::Done)
            }
            Command::PutAlias { alias } => {
                if !self.project_exists(&alias.project) {
                    return Err(ApplyError::not_found(format!(
                        "project {:?} not found",
                        alias.project
                    )));
                }
                if alias_key(&alias.project, alias.short_name()) != alias.name {
                    return Err(ApplyError::invalid(format!(
                        "alias key {:?} does not belong to project {:?}",
                        alias.name, alias.project
                    )));
                }
                if !self.images.contains_key(&alias.target) {
                    return Err(ApplyError::not_found(format!(
                        "image {:?} not found",
                        alias.target
                    )));
                }
                self.aliases.insert(alias.name.clone(), alias);
                Ok(ApplyOk::Done)
            }
            Command::DeleteAlias { name } => {
                self.aliases
                    .remove(&name)
                    .ok_or_else(|| ApplyError::not_found(format!("alias {name:?} not found")))?;
                Ok(ApplyOk::Done)
            }
            Command::PutOperation { operation } => {
                self.operations.insert(operation.id.clone(), operation);
                Ok(ApplyOk::Done)
            }
            Command::DeleteOperations { ids } => {
                for id in ids {
                    self.operations.remove(&id);
                }
                Ok(ApplyOk::Done)
            }
            // Only an event to publish: nothing to check, nothing changes.
            Command::Record { .. } => Ok(ApplyOk::Done),
            Command::AddApiKey { key } => {
                self.check_new_api_key(&key.id, &key.hash)?;
                if self.api_key_by_name(&key.name).is_some() {
                    return Err(ApplyError::conflict(format!(
                        "api key {:?} already exists",
                        key.name
                    )));
                }
                if key.role.is_project_scoped() && !self.project_exists(&key.project) {
                    return Err(ApplyError::not_found(format!(
                        "project {:?} not found",
                        key.project
                    )));
                }
                self.api_keys.insert(key.id.clone(), key);
                Ok(ApplyOk::Done)
            }
            Command::DeleteApiKey { id, now } => {
                let key = self
                    .api_keys
                    .get(&id)
                    .ok_or_else(|| ApplyError::not_found(format!("api key {id:?} not found")))?;
                // Here, not in the API, so that two admins deleting each other's keys at once
                // cannot both succeed.
                if self.is_last_admin(key, &now) {
                    return Err(ApplyError::conflict(format!(
                        "api key {:?} is the last admin key; create another admin key before revoking it",
                        key.name
                    )));
                }
                self.api_keys.remove(&id);
                Ok(ApplyOk::Done)
            }
            Command::RotateApiKey {
                id,
                hash,
                expires_at,
            } => {
                if self.api_key_by_hash(&hash).is_some() {
                    return Err(ApplyError::conflict(
                        "an api key with this secret already exists",
                    ));
                }
                let key = self
                    .api_keys
                    .get_mut(&id)
                    .ok_or_else(|| ApplyError::not_found(format!("api key {id:?} not found")))?;
                key.hash = hash;
                key.expires_at = expires_at;
                Ok(ApplyOk::Done)
            }
        }
    }

    /// Applies one write of a request made with an `Idempotency-Key`: a write the record
    /// already holds a result for is answered from the record without applying it again;
    /// otherwise it is applied and its result (success or error) recorded. The record is the
    /// only thing that changes when the command itself is rejected.
    fn apply_tagged(&mut self, tag: IdempotencyTag, command: Command) -> ApplyResult {
        if let Some(record) = self.idempotency.get(&tag.key) {
            if record.request_hash != tag.request_hash {
                return Err(key_reused());
            }
            if let Some(result) = record.results.get(&tag.seq) {
                return result.clone();
            }
        }
        let result = self.apply(command);
        self.idempotency
            .entry(tag.key)
            .or_insert_with(|| IdempotencyRecord {
                request_hash: tag.request_hash,
                created_at: tag.now,
                results: Default::default(),
                response: None,
            })
            .results
            .insert(tag.seq, result.clone());
        result
    }

    /// Whether applying `cmd` would only answer from an idempotency record (a repeated
    /// write), changing nothing but possibly the record.
    pub fn is_idempotent_replay(&self, cmd: &Command) -> bool {
        match cmd {
            Command::By {
                idempotency: Some(tag),
                ..
            } => self.idempotency.get(&tag.key).is_some_and(|r| {
                r.request_hash != tag.request_hash || r.results.contains_key(&tag.seq)
            }),
            Command::By { command, .. } | Command::IfMatch { command, .. } => {
                self.is_idempotent_replay(command)
            }
            _ => false,
        }
    }

    /// Checks that `hash` names an unexpired token of `kind` issued for `name`.
    fn check_join_token(
        &self,
        hash: &str,
        kind: JoinKind,
        name: &str,
        now: &str,
    ) -> Result<&JoinTokenRecord, ApplyError> {
        let Some(token) = self.join_tokens.get(hash) else {
            return Err(ApplyError::not_found(
                "the join token is unknown or already used",
            ));
        };
        let now_t = Rfc3339::parse(now)
            .ok_or_else(|| ApplyError::invalid(format!("invalid time {now:?}")))?;
        let expires = Rfc3339::parse(&token.expires_at).ok_or_else(|| {
            ApplyError::invalid(format!(
                "the join token has an invalid expiry time {:?}",
                token.expires_at
            ))
        })?;
        if now_t >= expires {
            return Err(ApplyError::invalid("the join token has expired"));
        }
        if token.kind != kind {
            return Err(ApplyError::invalid(match kind {
                JoinKind::Node => "the join token is for a controller, not a node",
                JoinKind::Controller => "the join token is for a node, not a controller",
            }));
        }
        if token.node_name != name {
            return Err(ApplyError::invalid(format!(
                "the join token is for {:?}, not {:?}",
                token.node_name, name
            )));
        }
        Ok(token)
    }

    /// Whether `action` may start on instance `name` now: nothing else pending, and what the
    /// action names (snapshots, nodes) exists or is free as it needs.
    fn check_action(&self, name: &str, action: &Action) -> Result<(), ApplyError> {
        let inst = self
            .instances
            .get(name)
            .ok_or_else(|| ApplyError::not_found(format!("instance {name:?} not found")))?;
        let shown = split_scoped_name(name).1;
        if let Some(busy) = &inst.pending {
            return Err(ApplyError::conflict(format!(
                "instance {shown:?} is busy with operation {}",
                busy.op
            )));
        }
        let missing = |snap: &str| {
            ApplyError::not_found(format!("instance {shown:?} has no snapshot {snap:?}"))
        };
        let taken = |snap: &str| {
            ApplyError::conflict(format!(
                "instance {shown:?} already has a snapshot {snap:?}"
            ))
        };
        match action {
            Action::Snapshot { name: snap, .. } if inst.snapshots.contains_key(snap) => {
                Err(taken(snap))
            }
            Action::DeleteSnapshot { name: snap } | Action::Restore { snapshot: snap }
                if !inst.snapshots.contains_key(snap) =>
            {
                Err(missing(snap))
            }
            Action::RenameSnapshot { from, .. } if !inst.snapshots.contains_key(from) => {
                Err(missing(from))
            }
            Action::RenameSnapshot { to, .. } if inst.snapshots.contains_key(to) => Err(taken(to)),
            Action::CopyFrom {
                source, snapshot, ..
            } => {
                let src = self.instances.get(source).ok_or_else(|| {
                    ApplyError::not_found(format!(
                        "instance {:?} not found",
                        split_scoped_name(source).1
                    ))
                })?;
                if !snapshot.is_empty() && !src.snapshots.contains_key(snapshot) {
                    return Err(ApplyError::not_found(format!(
                        "instance {:?} has no snapshot {snapshot:?}",
                        split_scoped_name(source).1
                    )));
                }
                Ok(())
            }
            Action::Migrate { from, to, .. } => {
                if *from != inst.node {
                    return Err(ApplyError::conflict(format!(
                        "instance {shown:?} is on node {:?}, not {from:?}",
                        inst.node
                    )));
                }
                if from == to {
                    return Err(ApplyError::invalid(format!(
                        "instance {shown:?} is already on node {to:?}"
                    )));
                }
                match self.nodes.get(to) {
                    None => Err(ApplyError::not_found(format!("node {to:?} not found"))),
                    Some(n) if n.status == NodeStatus::Offline => {
                        Err(ApplyError::invalid(format!("node {to:?} is offline")))
                    }
                    Some(_) => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn instance_mut(&mut self, name: &str) -> Result<&mut Instance, ApplyError> {
        self.instances
            .get_mut(name)
            .ok_or_else(|| ApplyError::not_found(format!("instance {name:?} not found")))
    }

    fn check_new_api_key(&self, id: &str, hash: &str) -> Result<(), ApplyError> {
        if self.api_keys.contains_key(id) {
            return Err(ApplyError::conflict(format!(
                "api key {id:?} already exists"
            )));
        }
        if self.api_key_by_hash(hash).is_some() {
            return Err(ApplyError::conflict(
                "an api key with this secret already exists",
            ));
        }
        Ok(())
    }

    /// The lowest free host address in the node's subnet, skipping the network address, the
    /// gateway (the cidr's own address) and the broadcast address; `None` if the node has no
    /// subnet (empty `ipv4_cidr`).
    fn allocate_ipv4(&self, node_name: &str) -> Result<Option<Ipv4Addr>, ApplyError> {
        let node = self
            .nodes
            .get(node_name)
            .ok_or_else(|| ApplyError::not_found(format!("node {node_name:?} not found")))?;
        if node.ipv4_cidr.is_empty() {
            return Ok(None);
        }
        let (gateway, prefix) = parse_cidr(&node.ipv4_cidr)?;
        // Every instance's address counts, wherever it runs now: a moved instance keeps the
        // address it got from its first node.
        let used: BTreeSet<Ipv4Addr> = self
            .instances
            .values()
            .filter_map(|i| i.ipv4.parse().ok())
            .collect();
        let mask: u32 = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        let network = u32::from(gateway) & mask;
        let broadcast = network | !mask;
        let gw = u32::from(gateway);
        if prefix < 31 {
            for candidate in (network + 1)..broadcast {
                let addr = Ipv4Addr::from(candidate);
                if candidate != gw && !used.contains(&addr) {
                    return Ok(Some(addr));
                }
            }
        }
        Err(ApplyError::conflict(format!(
            "no free address on node {node_name:?} ({})",
            node.ipv4_cidr
        )))
    }
}

/// The answer to an idempotency key used again for another request.
fn key_reused() -> ApplyError {
    ApplyError::unprocessable(
        "the idempotency key was already used for a different request; use a new key for a new request",
    )
}

/// An object as an error message names it.
fn describe(key: &ObjectKey) -> String {
    match key {
        ObjectKey::Instance(n) => format!("instance {:?}", split_scoped_name(n).1),
        ObjectKey::Profile(n) => format!("profile {:?}", split_scoped_name(n).1),
        ObjectKey::Project(n) => format!("project {n:?}"),
        ObjectKey::Alias(n) => format!(
            "image alias {:?}",
            n.split_once('@').map_or(n.as_str(), |(_, a)| a)
        ),
        ObjectKey::Image(n) => format!("image {n:?}"),
        ObjectKey::Node(n) => format!("node {n:?}"),
        ObjectKey::Cluster => "the cluster config".to_string(),
        other => format!("{other:?}"),
    }
}

/// Parses `a.b.c.d/len` into the address and prefix length.
fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u32), ApplyError> {
    let invalid = || ApplyError::invalid(format!("invalid ipv4 cidr {cidr:?}"));
    let (addr, len) = cidr.split_once('/').ok_or_else(invalid)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
    let len: u32 = len.parse().map_err(|_| invalid())?;
    if len > 32 {
        return Err(invalid());
    }
    Ok((addr, len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod idempotency_tests {
    use super::super::command::{ApplyErrorKind, IdempotencyTag, Requestor};
    use super::super::model::ApiKey;
    use super::*;

    fn tag(key: &str, hash: &str, seq: u32, now: &str) -> IdempotencyTag {
        IdempotencyTag {
            key: key.into(),
            request_hash: hash.into(),
            seq,
            now: now.into(),
        }
    }

    fn by(tag: IdempotencyTag, command: Command) -> Command {
        Command::By {
            requestor: Requestor {
                key: "ci".into(),
                key_id: "k1".into(),
                role: "admin".into(),
            },
            idempotency: Some(tag),
            command: Box::new(command),
        }
    }

    fn add_key(id: &str) -> Command {
        Command::AddApiKey {
            key: ApiKey {
                id: id.into(),
                name: format!("name-{id}"),
                hash: format!("hash-{id}"),
                role: super::super::model::Role::Admin,
                ..Default::default()
            },
        }
    }

    const T0: &str = "2026-01-01T00:00:00Z";

    #[test]
    fn a_repeated_write_is_answered_from_the_record() {
        let mut s = State::default();
        let t = tag("k1/abc", "h1", 0, T0);
        assert_eq!(s.apply(by(t.clone(), add_key("a"))), Ok(ApplyOk::Done));
        assert!(s.is_idempotent_replay(&by(t.clone(), add_key("a"))));
        // Applied again, AddApiKey would conflict: the record answers instead.
        let before = s.clone();
        assert_eq!(s.apply(by(t.clone(), add_key("a"))), Ok(ApplyOk::Done));
        assert_eq!(s, before);
        assert_eq!(s.api_keys.len(), 1);
        // The request's next write is its own.
        let t1 = tag("k1/abc", "h1", 1, T0);
        assert!(!s.is_idempotent_replay(&by(t1.clone(), add_key("b"))));
        assert_eq!(s.apply(by(t1, add_key("b"))), Ok(ApplyOk::Done));
        assert_eq!(s.api_keys.len(), 2);
        let record = &s.idempotency["k1/abc"];
        assert_eq!(record.results.len(), 2);
        assert_eq!(record.created_at, T0);
        // Without a tag nothing is recorded.
        let mut plain = State::default();
        plain
            .apply(Command::By {
                requestor: Requestor::default(),
                idempotency: None,
                command: Box::new(add_key("a")),
            })
            .unwrap();
        assert!(plain.idempotency.is_empty());
    }

    #[test]
    fn a_rejected_write_is_recorded_and_answered_the_same() {
        let mut s = State::default();
        let t = tag("k1/del", "h1", 0, T0);
        let del = Command::DeleteApiKey {
            id: "a".into(),
            now: String::new(),
        };
        let first = s.apply(by(t.clone(), del.clone())).unwrap_err();
        assert_eq!(first.kind, ApplyErrorKind::NotFound);
        assert_eq!(s.idempotency["k1/del"].results[&0], Err(first.clone()));
        // Even once the key exists, the retry gets the first answer and deletes nothing.
        s.apply(add_key("a")).unwrap();
        assert_eq!(s.apply(by(t, del)).unwrap_err(), first);
        assert!(s.api_keys.contains_key("a"));
    }

    #[test]
    fn a_key_reused_for_another_request_is_unprocessable() {
        let mut s = State::default();
        s.apply(by(tag("k1/x", "h1", 0, T0), add_key("a"))).unwrap();
        let before = s.clone();
        let e = s
            .apply(by(tag("k1/x", "h2", 0, T0), add_key("b")))
            .unwrap_err();
        assert_eq!(e.kind, ApplyErrorKind::Unprocessable);
        assert!(e.message.contains("different request"), "{e}");
        assert_eq!(s, before);
        let e = s
            .apply(Command::CompleteIdempotency {
                key: "k1/x".into(),
                request_hash: "h2".into(),
                status: 200,
                body: "{}".into(),
                etag: None,
                now: T0.into(),
            })
            .unwrap_err();
        assert_eq!(e.kind, ApplyErrorKind::Unprocessable);
        assert_eq!(s, before);
        // Another API key's record with the same header is another record.
        s.apply(by(tag("k2/x", "h2", 0, T0), add_key("b"))).unwrap();
        assert_eq!(s.api_keys.len(), 2);
    }

    #[test]
    fn a_guarded_write_is_replayed_whichever_way_it_is_wrapped() {
        let mut s = State::default();
        s.apply(Command::CreateProject {
            project: super::super::model::Project {
                name: "p".into(),
                ..Default::default()
            },
        })
        .unwrap();
        let etag = s.etag(&ObjectKey::Project("p".into())).unwrap();
        let update = |description: &str| Command::UpdateProject {
            name: "p".into(),
            description: description.into(),
            config: Default::default(),
        };
        let guard = |cmd: Command| Command::IfMatch {
            expect: vec![(ObjectKey::Project("p".into()), etag.clone())],
            command: Box::new(cmd),
        };
        // IfMatch outside the tagged By.
        let outside = guard(by(tag("k1/u1", "h", 0, T0), update("one")));
        assert_eq!(s.apply(outside.clone()), Ok(ApplyOk::Done));
        assert_eq!(
            s.apply(outside),
            Ok(ApplyOk::Done),
            "the retry is not a 412"
        );
        // And inside it.
        let etag2 = s.etag(&ObjectKey::Project("p".into())).unwrap();
        let inside = by(
            tag("k1/u2", "h", 0, T0),
            Command::IfMatch {
                expect: vec![(ObjectKey::Project("p".into()), etag2)],
                command: Box::new(update("two")),
            },
        );
        assert_eq!(s.apply(inside.clone()), Ok(ApplyOk::Done));
        assert_eq!(s.apply(inside), Ok(ApplyOk::Done));
        assert_eq!(s.projects["p"].description, "two");
        // A stale ETag without a record is still a 412.
        let e = s.apply(guard(update("three"))).unwrap_err();
        assert_eq!(e.kind, ApplyErrorKind::PreconditionFailed);
    }

    #[test]
    fn the_first_answer_is_kept() {
        let mut s = State::default();
        let complete = |status: u16, body: &str| Command::CompleteIdempotency {
            key: "k1/c".into(),
            request_hash: "h1".into(),
            status,
            body: body.into(),
            etag: Some("\"e1\"".into()),
            now: T0.into(),
        };
        // A request that failed before writing anything still gets a record.
        s.apply(complete(400, "{\"error\":\"bad\"}")).unwrap();
        s.apply(complete(200, "{}")).unwrap();
        let r = s.idempotency["k1/c"].response.clone().unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.body, "{\"error\":\"bad\"}");
        assert_eq!(r.etag.as_deref(), Some("\"e1\""));
    }

    #[test]
    fn old_records_are_pruned() {
        let mut s = State::default();
        s.apply(by(
            tag("k1/old", "h", 0, "2026-01-01T00:00:00Z"),
            add_key("a"),
        ))
        .unwrap();
        s.apply(by(
            tag("k1/new", "h", 0, "2026-01-02T00:00:00Z"),
            add_key("b"),
        ))
        .unwrap();
        let prune = Command::PruneIdempotency {
            before: "2026-01-01T12:00:00Z".into(),
        };
        assert_eq!(
            prune.touched(&s),
            vec![ObjectKey::Idempotency("k1/old".into())]
        );
        s.apply(prune).unwrap();
        assert_eq!(s.idempotency.keys().collect::<Vec<_>>(), vec!["k1/new"]);
        // Once pruned, the key is fresh again.
        assert!(!s.is_idempotent_replay(&by(tag("k1/old", "other", 0, T0), add_key("c"))));
    }

    #[test]
    fn records_are_touched_stored_and_reloaded() {
        let mut s = State::default();
        let cmd = by(tag("k1/a/b", "h", 0, T0), add_key("a"));
        let keys = cmd.touched(&s);
        assert!(keys.contains(&ObjectKey::Idempotency("k1/a/b".into())));
        assert!(keys.contains(&ObjectKey::ApiKey("a".into())));
        let wrapped = Command::IfMatch {
            expect: vec![],
            command: Box::new(cmd.clone()),
        };
        assert!(wrapped.idempotency_tag().is_some());
        assert!(
            wrapped
                .touched(&s)
                .contains(&ObjectKey::Idempotency("k1/a/b".into()))
        );
        s.apply(cmd).unwrap();
        let key = ObjectKey::Idempotency("k1/a/b".into());
        assert_eq!(key.to_storage_key(), "idempotency/k1/a/b");
        assert_eq!(
            ObjectKey::from_storage_key("idempotency/k1/a/b"),
            Some(key.clone())
        );
        let mut reloaded = State::default();
        for (k, v) in s.all_objects().unwrap() {
            reloaded.load_object(&k, &v).unwrap();
        }
        assert_eq!(reloaded.idempotency, s.idempotency);
    }
}

//! Addressing single objects of the [`State`], so the store can persist each applied command's
//! changes object by object (`instances/<name>`, ...) instead of the whole state.

use super::command::Command;
use super::model::State;

/// One object of the state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ObjectKey {
    Project(String),
    /// A profile by scoped name.
    Profile(String),
    Cluster,
    Node(String),
    Instance(String),
    Image(String),
    Alias(String),
    Operation(String),
    ApiKey(String),
    JoinToken(String),
    Controller(String),
    /// An idempotency record by `<api key id>/<Idempotency-Key>`.
    Idempotency(String),
}

/// Errors decoding a stored object.
#[derive(Debug, thiserror::Error)]
pub enum ObjectDecodeError {
    #[error("unknown object key {0:?}")]
    UnknownKey(String),
    #[error("cannot decode object {key:?}: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

impl ObjectKey {
    /// The storage key, e.g. `instances/web1`.
    pub fn to_storage_key(&self) -> String {
        match self {
            ObjectKey::Cluster => "cluster".to_string(),
            ObjectKey::Node(n) => format!("nodes/{n}"),
            ObjectKey::Instance(n) => format!("instances/{n}"),
            ObjectKey::Image(n) => format!("images/{n}"),
            ObjectKey::Alias(n) => format!("aliases/{n}"),
            ObjectKey::Operation(n) => format!("operations/{n}"),
            ObjectKey::ApiKey(n) => format!("api_keys/{n}"),
            ObjectKey::JoinToken(n) => format!("join_tokens/{n}"),
            ObjectKey::Controller(n) => format!("controllers/{n}"),
            ObjectKey::Project(n) => format!("projects/{n}"),
            ObjectKey::Profile(n) => format!("profiles/{n}"),
            ObjectKey::Idempotency(n) => format!("idempotency/{n}"),
        }
    }

    /// Parses a storage key made by [`ObjectKey::to_storage_key`].
    pub fn from_storage_key(key: &str) -> Option<ObjectKey> {
        if key == "cluster" {
            return Some(ObjectKey::Cluster);
        }
        let (kind, name) = key.split_once('/')?;
        let name = name.to_string();
        Some(match kind {
            "nodes" => ObjectKey::Node(name),
            "instances" => ObjectKey::Instance(name),
            "images" => ObjectKey::Image(name),
            "aliases" => ObjectKey::Alias(name),
            "operations" => ObjectKey::Operation(name),
            "api_keys" => ObjectKey::ApiKey(name),
            "join_tokens" => ObjectKey::JoinToken(name),
            "controllers" => ObjectKey::Controller(name),
            "projects" => ObjectKey::Project(name),
            "profiles" => ObjectKey::Profile(name),
            "idempotency" => ObjectKey::Idempotency(name),
            _ => return None,
        })
    }
}

/// The operations of a project (dropped when it is deleted or renamed).
fn project_operations(state: &State, project: &str) -> Vec<ObjectKey> {
    state
        .operations
        .values()
        .filter(|op| op.project == project)
        .map(|op| ObjectKey::Operation(op.id.clone()))
        .collect()
}

impl Command {
    /// The objects this command may change when applied to `state` (computed before applying).
    pub fn touched(&self, state: &State) -> Vec<ObjectKey> {
        match self {
            Command::By {
                command,
                idempotency,
                ..
            } => {
                let mut keys = command.touched(state);
                if let Some(tag) = idempotency {
                    keys.push(ObjectKey::Idempotency(tag.key.clone()));
                }
                keys
            }
            Command::IfMatch { command, .. } => command.touched(state),
            Command::CompleteIdempotency { key, .. } => vec![ObjectKey::Idempotency(key.clone())],
            Command::PruneIdempotency { before } => state
                .idempotency
                .iter()
                .filter(|(_, r)| r.created_at.as_str() < before.as_str())
                .map(|(k, _)| ObjectKey::Idempotency(k.clone()))
                .collect(),
            Command::CreateProject { project } => vec![
                ObjectKey::Project(project.name.clone()),
                ObjectKey::Profile(super::model::scoped_name(
                    &project.name,
                    super::model::DEFAULT_PROFILE,
                )),
            ],
            Command::UpdateProject { name, .. } => vec![ObjectKey::Project(name.clone())],
            Command::RenameProject { from, to } => {
                let mut keys = project_operations(state, from);
                for p in [from, to] {
                    keys.push(ObjectKey::Project(p.clone()));
                    keys.push(ObjectKey::Profile(super::model::scoped_name(
                        p,
                        super::model::DEFAULT_PROFILE,
                    )));
                }
                keys
            }
            Command::DeleteProject { name } => {
                let mut keys = project_operations(state, name);
                keys.push(ObjectKey::Project(name.clone()));
                keys.push(ObjectKey::Profile(super::model::scoped_name(
                    name,
                    super::model::DEFAULT_PROFILE,
                )));
                keys
            }
            Command::CreateProfile { profile } => vec![ObjectKey::Profile(profile.name.clone())],
            Command::UpdateProfile { name, .. } | Command::DeleteProfile { name } => {
                vec![ObjectKey::Profile(name.clone())]
            }
            Command::RenameProfile { from, to } => {
                let mut keys = vec![
                    ObjectKey::Profile(from.clone()),
                    ObjectKey::Profile(to.clone()),
                ];
                if let Some(p) = state.profiles.get(from) {
                    let short = p.short_name().to_string();
                    keys.extend(
                        state
                            .instances
                            .values()
                            .filter(|i| i.project == p.project && i.profiles.contains(&short))
                            .map(|i| ObjectKey::Instance(i.name.clone())),
                    );
                }
                keys
            }
            Command::RotateApiKey { id, .. } => vec![ObjectKey::ApiKey(id.clone())],
            Command::Bootstrap { admin_key, .. } => vec![
                ObjectKey::Cluster,
                ObjectKey::ApiKey(admin_key.id.clone()),
                ObjectKey::Project(super::model::DEFAULT_PROJECT.to_string()),
                ObjectKey::Profile(super::model::DEFAULT_PROFILE.to_string()),
            ],
            Command::SetClusterConfig { .. } => vec![ObjectKey::Cluster],
            Command::AddJoinToken { hash, .. } => vec![ObjectKey::JoinToken(hash.clone())],
            Command::JoinNode {
                token_hash, node, ..
            } => vec![
                ObjectKey::JoinToken(token_hash.clone()),
                ObjectKey::Node(node.name.clone()),
            ],
            Command::SetNodeStatus { name, .. }
            | Command::RemoveNode { name }
            | Command::SetNodeConfig { name, .. }
            | Command::SetNodeEvacuated { name, .. }
            | Command::UpdateNodeCapacity { name, .. } => vec![ObjectKey::Node(name.clone())],
            Command::RegisterController { record } => {
                vec![
                    ObjectKey::Cluster,
                    ObjectKey::Controller(record.name.clone()),
                ]
            }
            Command::JoinController {
                token_hash, name, ..
            } => vec![
                ObjectKey::Cluster,
                ObjectKey::JoinToken(token_hash.clone()),
                ObjectKey::Controller(name.clone()),
            ],
            Command::RemoveController { name } => {
                vec![ObjectKey::Cluster, ObjectKey::Controller(name.clone())]
            }
            Command::SetInstanceAction {
                name, operation, ..
            } => vec![
                ObjectKey::Instance(name.clone()),
                ObjectKey::Operation(operation.id.clone()),
            ],
            Command::FinishAction { name, op, .. } => vec![
                ObjectKey::Instance(name.clone()),
                ObjectKey::Operation(op.clone()),
            ],
            Command::CreateInstance {
                instance,
                operation,
            } => {
                // The image too: apply stamps its `last_used_at`.
                let mut keys = vec![
                    ObjectKey::Instance(instance.name.clone()),
                    ObjectKey::Image(instance.image.clone()),
                ];
                if let Some(op) = operation {
                    keys.push(ObjectKey::Operation(op.id.clone()));
                }
                keys
            }
            Command::UpdateInstance { name, .. }
            | Command::SetDesiredState { name, .. }
            | Command::ObserveInstance { name, .. }
            | Command::SwitchNode { name, .. }
            | Command::SetEvacuation { name, .. }
            | Command::DeleteInstance { name } => vec![ObjectKey::Instance(name.clone())],
            Command::RenameInstance { from, to } => vec![
                ObjectKey::Instance(from.clone()),
                ObjectKey::Instance(to.clone()),
            ],
            Command::PutImage { image } => vec![ObjectKey::Image(image.fingerprint.clone())],
            Command::UpdateImage { fingerprint, .. }
            | Command::SetImageLocation { fingerprint, .. } => {
                vec![ObjectKey::Image(fingerprint.clone())]
            }
            Command::DeleteImage { fingerprint } => {
                let mut keys = vec![ObjectKey::Image(fingerprint.clone())];
                keys.extend(
                    state
                        .aliases
                        .values()
                        .filter(|a| &a.target == fingerprint)
                        .map(|a| ObjectKey::Alias(a.name.clone())),
                );
                keys
            }
            Command::PutAlias { alias } | Command::CreateAlias { alias } => {
                vec![ObjectKey::Alias(alias.name.clone())]
            }
            Command::UnshareImage {
                fingerprint,
                project,
            } => {
                let mut keys = vec![ObjectKey::Image(fingerprint.clone())];
                keys.extend(
                    state
                        .aliases
                        .values()
                        .filter(|a| &a.target == fingerprint && &a.project == project)
                        .map(|a| ObjectKey::Alias(a.name.clone())),
                );
                keys
            }
            Command::DeleteAlias { name } => vec![ObjectKey::Alias(name.clone())],
            Command::PutOperation { operation } => {
                vec![ObjectKey::Operation(operation.id.clone())]
            }
            Command::DeleteOperations { ids } => ids
                .iter()
                .map(|id| ObjectKey::Operation(id.clone()))
                .collect(),
            Command::Record { .. } => Vec::new(),
            Command::AddApiKey { key } => vec![ObjectKey::ApiKey(key.id.clone())],
            Command::DeleteApiKey { id, .. } => vec![ObjectKey::ApiKey(id.clone())],
        }
    }
}

impl State {
    /// The object's serialized value (JSON), or `None` if it does not exist.
    pub fn encode_object(&self, key: &ObjectKey) -> Result<Option<Vec<u8>>, serde_json::Error> {
        fn enc<T: serde::Serialize>(v: Option<&T>) -> Result<Option<Vec<u8>>, serde_json::Error> {
            v.map(serde_json::to_vec).transpose()
        }
        match key {
            ObjectKey::Cluster => enc(Some(&self.cluster)),
            ObjectKey::Node(n) => enc(self.nodes.get(n)),
            ObjectKey::Instance(n) => enc(self.instances.get(n)),
            ObjectKey::Image(n) => enc(self.images.get(n)),
            ObjectKey::Alias(n) => enc(self.aliases.get(n)),
            ObjectKey::Operation(n) => enc(self.operations.get(n)),
            ObjectKey::ApiKey(n) => enc(self.api_keys.get(n)),
            ObjectKey::JoinToken(n) => enc(self.join_tokens.get(n)),
            ObjectKey::Controller(n) => enc(self.controllers.get(n)),
            ObjectKey::Project(n) => enc(self.projects.get(n)),
            ObjectKey::Profile(n) => enc(self.profiles.get(n)),
            ObjectKey::Idempotency(n) => enc(self.idempotency.get(n)),
        }
    }

    /// Every object of the state with its storage key and value (used to write a snapshot out).
    pub fn all_objects(&self) -> Result<Vec<(String, Vec<u8>)>, serde_json::Error> {
        let mut keys = vec![ObjectKey::Cluster];
        keys.extend(self.nodes.keys().cloned().map(ObjectKey::Node));
        keys.extend(self.instances.keys().cloned().map(ObjectKey::Instance));
        keys.extend(self.images.keys().cloned().map(ObjectKey::Image));
        keys.extend(self.aliases.keys().cloned().map(ObjectKey::Alias));
        keys.extend(self.operations.keys().cloned().map(ObjectKey::Operation));
        keys.extend(self.api_keys.keys().cloned().map(ObjectKey::ApiKey));
        keys.extend(self.join_tokens.keys().cloned().map(ObjectKey::JoinToken));
        keys.extend(self.controllers.keys().cloned().map(ObjectKey::Controller));
        keys.extend(self.projects.keys().cloned().map(ObjectKey::Project));
        keys.extend(self.profiles.keys().cloned().map(ObjectKey::Profile));
        keys.extend(self.idempotency.keys().cloned().map(ObjectKey::Idempotency));
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(v) = self.encode_object(&key)? {
                out.push((key.to_storage_key(), v));
            }
        }
        Ok(out)
    }

    /// Inserts one stored object (used when reloading the state from disk).
    pub fn load_object(
        &mut self,
        storage_key: &str,
        value: &[u8],
    ) -> Result<(), ObjectDecodeError> {
        let key = ObjectKey::from_storage_key(storage_key)
            .ok_or_else(|| ObjectDecodeError::UnknownKey(storage_key.to_string()))?;
        let err = |source| ObjectDecodeError::Decode {
            key: storage_key.to_string(),
            source,
        };
        match key {
            ObjectKey::Cluster => self.cluster = serde_json::from_slice(value).map_err(err)?,
            ObjectKey::Node(n) => {
                self.nodes
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Instance(n) => {
                self.instances
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Image(n) => {
                self.images
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Alias(n) => {
                self.aliases
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Operation(n) => {
                self.operations
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::ApiKey(n) => {
                self.api_keys
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::JoinToken(n) => {
                self.join_tokens
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Controller(n) => {
                self.controllers
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Project(n) => {
                self.projects
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Profile(n) => {
                self.profiles
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
            ObjectKey::Idempotency(n) => {
                self.idempotency
                    .insert(n, serde_json::from_slice(value).map_err(err)?);
            }
        }
        Ok(())
    }
}

//! Keeps `docs/api/openapi.yaml` true to the server: every route of
//! `controller/src/api/mod.rs::router` is documented and every documented operation is a
//! route; each operation has a summary, a description and its path parameters; the query
//! parameters documented are exactly those its handler reads (the fields of its `Query<T>`
//! struct, and `project` when it takes a `Scope`); `security: []` marks exactly the routes
//! served without an API key; every JSON request body names its Rust type (`x-rust-type`)
//! and its example parses into it; every schema with an `x-rust-type` (request bodies and
//! answers) lists exactly that type's fields, nested structs too; every `$ref` resolves.
//!
//! The routes are read from the router's source text, so the test needs no server and no
//! network. It understands `.route("PATH", get(..).post(..)...)`; anything else that adds
//! routes (`nest`, `route_service`, ...) makes it fail until it is taught about it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

/// The HTTP methods axum's method routers are built with, as OpenAPI names them.
const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

/// Methods OpenAPI knows that the router does not use: documenting one is an error.
const OTHER_METHODS: &[&str] = &["head", "options", "trace"];

/// Calls on a method router that add no route.
const NOT_ROUTES: &[&str] = &["layer", "route_layer", "with_state"];

/// Router calls that would add routes this parser cannot see.
const UNSUPPORTED: &[&str] = &["nest", "nest_service", "route_service", "fallback_service"];

/// A route: its OpenAPI path (`/1.0/instances/{name}`) and a lowercase method.
type Route = (String, String);

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---- Rust source -------------------------------------------------------------------------

/// `src` without comments; string and char literals are kept as they are.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'"' => {
                let end = string_end(b, i);
                out.push_str(&src[i..end]);
                i = end;
            }
            b'\'' => {
                let end = char_literal_end(b, i).unwrap_or(i + 1);
                out.push_str(&src[i..end]);
                i = end;
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or(' ');
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// The index just past the string literal that starts at `b[start] == '"'`.
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The index just past a char literal at `b[start] == '\''`; `None` for a lifetime.
fn char_literal_end(b: &[u8], start: usize) -> Option<usize> {
    if b.get(start + 1) == Some(&b'\\') {
        let mut i = start + 2;
        while i < b.len() && b[i] != b'\'' {
            i += 1;
        }
        return Some(i + 1);
    }
    // One (possibly multi-byte) character, then a quote.
    let rest = std::str::from_utf8(&b[start + 1..]).ok()?;
    let c = rest.chars().next()?;
    (b.get(start + 1 + c.len_utf8()) == Some(&b'\'')).then_some(start + 2 + c.len_utf8())
}

/// The index of the bracket closing the one at `b[open]` (`(`, `{` or `[`), skipping literals.
fn matching(b: &[u8], open: usize) -> Result<usize, String> {
    let mut depth = 0i32;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'\'' => {
                if let Some(end) = char_literal_end(b, i) {
                    i = end;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(format!("unbalanced bracket at byte {open}"))
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Identifiers directly followed by `(` at the top level of `expr` (calls and method calls,
/// not what is inside their arguments), each with the text of its arguments.
fn top_level_calls(expr: &str) -> Result<Vec<(String, String)>, String> {
    let b = expr.as_bytes();
    let mut calls = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if is_ident(c) && (i == 0 || !is_ident(b[i - 1])) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            if b.get(j) == Some(&b'(') {
                let close = matching(b, j)?;
                calls.push((
                    expr[start..i].to_string(),
                    expr[j + 1..close].trim().to_string(),
                ));
                i = close + 1;
            }
            continue;
        }
        match c {
            b'(' | b'{' | b'[' => i = matching(b, i)? + 1,
            b'"' => i = string_end(b, i),
            _ => i += 1,
        }
    }
    Ok(calls)
}

/// Splits `args` at its top-level commas.
fn split_args(args: &str) -> Result<Vec<&str>, String> {
    split_top_level(args, b',')
}

/// Splits `text` at `sep` where it is outside brackets and literals.
fn split_top_level(args: &str, sep: u8) -> Result<Vec<&str>, String> {
    let b = args.as_bytes();
    let mut parts = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'(' | b'{' | b'[' => i = matching(b, i)? + 1,
            b'"' => i = string_end(b, i),
            c if c == sep => {
                parts.push(args[start..i].trim());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    let last = args[start..].trim();
    if !last.is_empty() {
        parts.push(last);
    }
    Ok(parts)
}

/// Splits a struct body into its fields: at commas outside brackets, literals and the
/// angle brackets of generic types.
fn split_fields(body: &str) -> Result<Vec<&str>, String> {
    let b = body.as_bytes();
    let mut parts = Vec::new();
    let (mut start, mut i, mut angle) = (0, 0, 0i32);
    while i < b.len() {
        match b[i] {
            b'(' | b'{' | b'[' => i = matching(b, i)? + 1,
            b'"' => i = string_end(b, i),
            b'<' => {
                angle += 1;
                i += 1;
            }
            b'>' => {
                angle -= 1;
                i += 1;
            }
            b',' if angle == 0 => {
                parts.push(body[start..i].trim());
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    let last = body[start..].trim();
    if !last.is_empty() {
        parts.push(last);
    }
    Ok(parts)
}

/// axum's `{name}` and `{*name}` path syntax as OpenAPI writes it (`{name}`).
fn openapi_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

/// Every route+method the body of `fn router` in `src` (the text of `api/mod.rs`) adds, with
/// the text of its handler (`instances::list`, or a closure).
fn routes_from_source(src: &str) -> Result<BTreeMap<Route, String>, String> {
    let src = strip_comments(src);
    let b = src.as_bytes();
    let at = src
        .find("fn router(")
        .ok_or("api/mod.rs has no `fn router(`")?;
    let open = at + src[at..].find('{').ok_or("fn router has no body")?;
    let close = matching(b, open)?;
    let body = &src[open..=close];
    for call in UNSUPPORTED {
        if body.contains(&format!(".{call}(")) {
            return Err(format!(
                "the router uses `.{call}(`, which this test does not understand; teach it"
            ));
        }
    }
    let routes = routes_in(body)?;
    if routes.is_empty() {
        return Err("no `.route(` found in fn router".into());
    }
    Ok(routes)
}

/// The routes of `fn router` in `src` that need no API key: those added in a statement of
/// its body that does not apply the `auth::authenticate` layer.
fn open_routes_from_source(src: &str) -> Result<BTreeSet<Route>, String> {
    let src = strip_comments(src);
    let at = src
        .find("fn router(")
        .ok_or("api/mod.rs has no `fn router(`")?;
    let open = at + src[at..].find('{').ok_or("fn router has no body")?;
    let close = matching(src.as_bytes(), open)?;
    let statements = split_top_level(&src[open + 1..close], b';')?;
    if !statements.iter().any(|s| s.contains("authenticate")) {
        return Err("no statement of fn router applies auth::authenticate; teach this test where authentication is".into());
    }
    let mut open_routes = BTreeSet::new();
    for statement in statements {
        if !statement.contains("authenticate") {
            open_routes.extend(routes_in(statement)?.into_keys());
        }
    }
    Ok(open_routes)
}

/// Every `.route(PATH, METHOD_ROUTER)` in `body` (comments already stripped).
fn routes_in(body: &str) -> Result<BTreeMap<Route, String>, String> {
    let bb = body.as_bytes();
    let mut routes = BTreeMap::new();
    let mut from = 0;
    while let Some(found) = body[from..].find(".route(") {
        let open = from + found + ".route".len();
        let close = matching(bb, open)?;
        let args = split_args(&body[open + 1..close])?;
        from = close + 1;
        let [path, methods] = args[..] else {
            return Err(format!(
                "cannot read the route {:?}: expected a path and a method router",
                &body[open..=close]
            ));
        };
        let path = path
            .strip_prefix('"')
            .and_then(|p| p.strip_suffix('"'))
            .ok_or_else(|| format!("route path {path} is not a string literal"))?;
        let calls = top_level_calls(methods)?;
        let mut any = false;
        for (call, handler) in calls {
            if METHODS.contains(&call.as_str()) {
                any = true;
                let route = (openapi_path(path), call.clone());
                if routes.insert(route, handler).is_some() {
                    return Err(format!("{} {path} is routed twice", call.to_uppercase()));
                }
            } else if !NOT_ROUTES.contains(&call.as_str()) {
                return Err(format!(
                    "route {path}: `{call}(` is not a method this test knows (get, post, put, patch, delete)"
                ));
            }
        }
        if !any {
            return Err(format!("route {path} has no method"));
        }
    }
    Ok(routes)
}

// ---- The OpenAPI document ----------------------------------------------------------------

/// The value a local `$ref` (`#/components/...`) points to.
fn resolve_ref<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    doc.pointer(pointer)
}

/// `v` itself, or what it refers to when it is a `{"$ref": ...}` (one level; refs to refs
/// are followed too).
fn deref<'a>(doc: &'a Value, v: &'a Value) -> Result<&'a Value, String> {
    let mut v = v;
    for _ in 0..8 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => v = resolve_ref(doc, r).ok_or_else(|| format!("$ref {r} points nowhere"))?,
            None => return Ok(v),
        }
    }
    Err("a chain of $ref is too long".into())
}

/// `{name}` parameters of an OpenAPI path.
fn path_params(path: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.insert(rest[open + 1..open + close].to_string());
        rest = &rest[open + close + 1..];
    }
    out
}

fn non_empty_str(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty())
}

/// Checks that turn an example body into a Rust type: `Err` says why it does not parse.
type Check = fn(&Value) -> Result<(), String>;

fn parses<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(v.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The check of each request type an `x-rust-type` may name.
fn rust_type(name: &str) -> Option<Check> {
    use berth_proto::api::{self, tenancy};
    Some(match name {
        "berth_proto::api::InstancesPost" => parses::<api::InstancesPost>,
        "berth_proto::api::InstancePut" => parses::<api::InstancePut>,
        "berth_proto::api::InstancePatch" => parses::<api::InstancePatch>,
        "berth_proto::api::InstancePost" => parses::<api::InstancePost>,
        "berth_proto::api::InstanceStatePut" => parses::<api::InstanceStatePut>,
        "berth_proto::api::InstanceExecPost" => parses::<api::InstanceExecPost>,
        "berth_proto::api::ImagesPost" => parses::<api::ImagesPost>,
        "berth_proto::api::ImageAliasesPost" => parses::<api::ImageAliasesPost>,
        "berth_proto::api::ClusterJoinPost" => parses::<api::ClusterJoinPost>,
        "berth_proto::api::ControllerJoinPost" => parses::<api::ControllerJoinPost>,
        "berth_proto::api::JoinTokenPost" => parses::<api::JoinTokenPost>,
        "berth_proto::api::ClusterMemberPatch" => parses::<api::ClusterMemberPatch>,
        "berth_controller::api::cluster::ClusterPatch" => {
            parses::<berth_controller::api::cluster::ClusterPatch>
        }
        "berth_proto::api::InstanceSnapshotsPost" => parses::<api::InstanceSnapshotsPost>,
        "berth_proto::api::InstanceSnapshotPost" => parses::<api::InstanceSnapshotPost>,
        "berth_proto::api::ImagePut" => parses::<api::ImagePut>,
        "berth_controller::api::images::ImagePatch" => {
            parses::<berth_controller::api::images::ImagePatch>
        }
        "berth_proto::api::ClusterMemberStatePost" => parses::<api::ClusterMemberStatePost>,
        "berth_proto::api::tenancy::ProjectsPost" => parses::<tenancy::ProjectsPost>,
        "berth_proto::api::tenancy::ProjectPut" => parses::<tenancy::ProjectPut>,
        "berth_proto::api::tenancy::ProjectPatch" => parses::<tenancy::ProjectPatch>,
        "berth_proto::api::tenancy::RenamePost" => parses::<tenancy::RenamePost>,
        "berth_proto::api::tenancy::ProfilesPost" => parses::<tenancy::ProfilesPost>,
        "berth_proto::api::tenancy::ProfilePut" => parses::<tenancy::ProfilePut>,
        "berth_proto::api::tenancy::ProfilePatch" => parses::<tenancy::ProfilePatch>,
        "berth_proto::api::tenancy::KeysPost" => parses::<tenancy::KeysPost>,
        "berth_proto::api::tenancy::KeyRotatePost" => parses::<tenancy::KeyRotatePost>,
        // Answers (their schemas are checked field by field; they take no example).
        "berth_proto::api::Operation" => parses::<api::Operation>,
        "berth_proto::api::Instance" => parses::<api::Instance>,
        "berth_proto::api::InstanceState" => parses::<api::InstanceState>,
        "berth_proto::api::Image" => parses::<api::Image>,
        "berth_proto::api::ImageAlias" => parses::<api::ImageAlias>,
        "berth_proto::api::Cluster" => parses::<api::Cluster>,
        "berth_proto::api::ClusterController" => parses::<api::ClusterController>,
        "berth_proto::api::NodeResources" => parses::<api::NodeResources>,
        "berth_proto::api::ClusterNode" => parses::<api::ClusterNode>,
        "berth_proto::api::ClusterMember" => parses::<api::ClusterMember>,
        "berth_proto::api::JoinTokenResponse" => parses::<api::JoinTokenResponse>,
        "berth_proto::api::ClusterJoinResponse" => parses::<api::ClusterJoinResponse>,
        "berth_proto::api::ControllerJoinResponse" => parses::<api::ControllerJoinResponse>,
        "berth_proto::api::tenancy::Project" => parses::<tenancy::Project>,
        "berth_proto::api::tenancy::ProjectState" => parses::<tenancy::ProjectState>,
        "berth_proto::api::tenancy::Profile" => parses::<tenancy::Profile>,
        "berth_proto::api::tenancy::ApiKey" => parses::<tenancy::ApiKey>,
        "berth_proto::api::tenancy::KeyCreated" => parses::<tenancy::KeyCreated>,
        "berth_proto::api::tenancy::Event" => parses::<tenancy::Event>,
        "berth_proto::api::tenancy::LifecycleEvent" => parses::<tenancy::LifecycleEvent>,
        "berth_proto::api::InstanceSnapshot" => parses::<api::InstanceSnapshot>,
        "berth_proto::api::TransferMetadata" => parses::<api::TransferMetadata>,
        "berth_proto::api::TransferPass" => parses::<api::TransferPass>,
        "berth_controller::api::evacuate::EvacuationMetadata" => {
            parses::<berth_controller::api::evacuate::EvacuationMetadata>
        }
        "berth_controller::api::evacuate::EvacuationResult" => {
            parses::<berth_controller::api::evacuate::EvacuationResult>
        }
        _ => return None,
    })
}

fn is_json(media_type: &str) -> bool {
    let essence = media_type.split(';').next().unwrap_or("").trim();
    essence == "application/json" || essence.ends_with("+json")
}

/// The examples of a media type object: `example`, or the `value` of each of `examples`.
fn examples<'a>(doc: &'a Value, media: &'a Value) -> Result<Vec<(String, &'a Value)>, String> {
    let mut out = Vec::new();
    if let Some(e) = media.get("example") {
        out.push(("example".to_string(), e));
    }
    if let Some(map) = media.get("examples").and_then(Value::as_object) {
        for (name, e) in map {
            let e = deref(doc, e)?;
            let value = e
                .get("value")
                .ok_or_else(|| format!("example {name} has no value"))?;
            out.push((format!("examples.{name}"), value));
        }
    }
    Ok(out)
}

/// Every `$ref` in `v` that does not resolve in `doc`.
fn dangling_refs(doc: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    let ok = child
                        .as_str()
                        .is_some_and(|r| resolve_ref(doc, r).is_some());
                    if !ok {
                        out.push(format!("{at}: $ref {child} points nowhere"));
                    }
                } else {
                    dangling_refs(doc, child, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                dangling_refs(doc, child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Every `x-rust-type` named anywhere in `v`, with where.
fn rust_type_names(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "x-rust-type" {
                    out.push((at.to_string(), child.as_str().unwrap_or("").to_string()));
                } else {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    rust_type_names(child, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                rust_type_names(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// `T::default()` as JSON: every field the type (de)serializes, by its JSON name.
fn shape<T: Default + serde::Serialize>() -> Value {
    shape_of(T::default())
}

/// The fields of struct `name` of `api/<module>.rs` (a controller type without `Serialize`,
/// such as `ClusterPatch`), read from its source.
fn source_shape(module: &str, name: &str) -> Value {
    let src = strip_comments(&repo_file(&format!("controller/src/api/{module}.rs")));
    let fields = struct_body(&src, name)
        .ok_or_else(|| format!("struct {name} not found in api/{module}.rs"))
        .and_then(|(body, attrs)| query_fields(body, attrs));
    match fields {
        Ok(fields) => fields.into_iter().map(|f| (f, Value::Null)).collect(),
        Err(e) => Value::String(e),
    }
}

/// A PUT body with its optional `restore` (left out of the JSON when empty).
fn instance_put_shape() -> Value {
    shape_of(berth_proto::api::InstancePut {
        restore: "snap0".into(),
        ..Default::default()
    })
}

/// Transfer metadata with its optional `downtime_ms`.
fn transfer_metadata_shape() -> Value {
    shape_of(berth_proto::api::TransferMetadata {
        downtime_ms: Some(0),
        ..Default::default()
    })
}

/// An instance with its optional `state` (left out of the JSON when absent).
fn instance_shape() -> Value {
    shape_of(berth_proto::api::Instance {
        state: Some(Default::default()),
        ..Default::default()
    })
}

/// A lifecycle event with its optional `requestor`.
fn lifecycle_shape() -> Value {
    shape_of(berth_proto::api::tenancy::LifecycleEvent {
        requestor: Some(Default::default()),
        ..Default::default()
    })
}

fn shape_of(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The shape (field names, nested objects) of each type [`rust_type`] knows.
fn rust_shape(name: &str) -> Option<Value> {
    use berth_proto::api::{self, tenancy};
    Some(match name {
        "berth_proto::api::InstancesPost" => shape::<api::InstancesPost>(),
        "berth_proto::api::InstancePut" => instance_put_shape(),
        "berth_proto::api::InstancePatch" => shape::<api::InstancePatch>(),
        "berth_proto::api::InstancePost" => shape::<api::InstancePost>(),
        "berth_proto::api::InstanceStatePut" => shape::<api::InstanceStatePut>(),
        "berth_proto::api::InstanceExecPost" => shape::<api::InstanceExecPost>(),
        "berth_proto::api::ImagesPost" => shape::<api::ImagesPost>(),
        "berth_proto::api::ImageAliasesPost" => shape::<api::ImageAliasesPost>(),
        "berth_proto::api::ClusterJoinPost" => shape::<api::ClusterJoinPost>(),
        "berth_proto::api::ControllerJoinPost" => shape::<api::ControllerJoinPost>(),
        "berth_proto::api::JoinTokenPost" => shape::<api::JoinTokenPost>(),
        "berth_proto::api::ClusterMemberPatch" => shape::<api::ClusterMemberPatch>(),
        "berth_controller::api::cluster::ClusterPatch" => source_shape("cluster", "ClusterPatch"),
        "berth_proto::api::InstanceSnapshotsPost" => shape::<api::InstanceSnapshotsPost>(),
        "berth_proto::api::InstanceSnapshotPost" => shape::<api::InstanceSnapshotPost>(),
        "berth_proto::api::ImagePut" => shape::<api::ImagePut>(),
        "berth_controller::api::images::ImagePatch" => source_shape("images", "ImagePatch"),
        "berth_proto::api::ClusterMemberStatePost" => shape::<api::ClusterMemberStatePost>(),
        "berth_proto::api::InstanceSnapshot" => shape::<api::InstanceSnapshot>(),
        "berth_proto::api::TransferMetadata" => transfer_metadata_shape(),
        "berth_proto::api::TransferPass" => shape::<api::TransferPass>(),
        "berth_controller::api::evacuate::EvacuationMetadata" => {
            shape::<berth_controller::api::evacuate::EvacuationMetadata>()
        }
        "berth_controller::api::evacuate::EvacuationResult" => {
            shape::<berth_controller::api::evacuate::EvacuationResult>()
        }
        "berth_proto::api::tenancy::ProjectsPost" => shape::<tenancy::ProjectsPost>(),
        "berth_proto::api::tenancy::ProjectPut" => shape::<tenancy::ProjectPut>(),
        "berth_proto::api::tenancy::ProjectPatch" => shape::<tenancy::ProjectPatch>(),
        "berth_proto::api::tenancy::RenamePost" => shape::<tenancy::RenamePost>(),
        "berth_proto::api::tenancy::ProfilesPost" => shape::<tenancy::ProfilesPost>(),
        "berth_proto::api::tenancy::ProfilePut" => shape::<tenancy::ProfilePut>(),
        "berth_proto::api::tenancy::ProfilePatch" => shape::<tenancy::ProfilePatch>(),
        "berth_proto::api::tenancy::KeysPost" => shape::<tenancy::KeysPost>(),
        "berth_proto::api::tenancy::KeyRotatePost" => shape::<tenancy::KeyRotatePost>(),
        "berth_proto::api::Operation" => shape::<api::Operation>(),
        "berth_proto::api::Instance" => instance_shape(),
        "berth_proto::api::InstanceState" => shape::<api::InstanceState>(),
        "berth_proto::api::Image" => shape::<api::Image>(),
        "berth_proto::api::ImageAlias" => shape::<api::ImageAlias>(),
        "berth_proto::api::Cluster" => shape::<api::Cluster>(),
        "berth_proto::api::ClusterController" => shape::<api::ClusterController>(),
        "berth_proto::api::NodeResources" => shape::<api::NodeResources>(),
        "berth_proto::api::ClusterNode" => shape::<api::ClusterNode>(),
        "berth_proto::api::ClusterMember" => shape::<api::ClusterMember>(),
        "berth_proto::api::JoinTokenResponse" => shape::<api::JoinTokenResponse>(),
        "berth_proto::api::ClusterJoinResponse" => shape::<api::ClusterJoinResponse>(),
        "berth_proto::api::ControllerJoinResponse" => shape::<api::ControllerJoinResponse>(),
        "berth_proto::api::tenancy::Project" => shape::<tenancy::Project>(),
        "berth_proto::api::tenancy::ProjectState" => shape::<tenancy::ProjectState>(),
        "berth_proto::api::tenancy::Profile" => shape::<tenancy::Profile>(),
        "berth_proto::api::tenancy::ApiKey" => shape::<tenancy::ApiKey>(),
        "berth_proto::api::tenancy::KeyCreated" => shape::<tenancy::KeyCreated>(),
        "berth_proto::api::tenancy::Event" => shape::<tenancy::Event>(),
        "berth_proto::api::tenancy::LifecycleEvent" => lifecycle_shape(),
        _ => return None,
    })
}

/// Differences between the `properties` of `schema` and the fields of `shape`, recursing
/// into nested objects whose schema lists properties (maps, with none listed, are leaves).
fn shape_problems(doc: &Value, schema: &Value, shape: &Value, at: &str, out: &mut Vec<String>) {
    if let Value::String(e) = shape {
        out.push(format!("{at}: {e}"));
        return;
    }
    let Ok(schema) = deref(doc, schema) else {
        return;
    };
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let Some(fields) = shape.as_object() else {
        out.push(format!(
            "{at}: the schema lists properties but the Rust type is not a struct"
        ));
        return;
    };
    for name in props.keys().filter(|k| !fields.contains_key(*k)) {
        out.push(format!(
            "{at}: property {name:?} is not a field of the Rust type"
        ));
    }
    for name in fields.keys().filter(|k| !props.contains_key(*k)) {
        out.push(format!(
            "{at}: field {name:?} of the Rust type is not documented"
        ));
    }
    for (name, prop) in props {
        if let Some(inner) = fields.get(name).filter(|v| v.is_object()) {
            shape_problems(doc, prop, inner, &format!("{at}.{name}"), out);
        }
    }
}

/// Checks one operation: summary, description, path parameters and JSON request bodies.
fn check_operation(
    doc: &Value,
    path: &str,
    method: &str,
    op: &Value,
    path_level: &[Value],
    out: &mut Vec<String>,
) {
    let at = format!("{} {path}", method.to_uppercase());
    if !non_empty_str(op.get("summary")) {
        out.push(format!("{at}: no summary"));
    }
    if !non_empty_str(op.get("description")) {
        out.push(format!("{at}: no description"));
    }
    if op
        .get("responses")
        .and_then(Value::as_object)
        .is_none_or(|r| r.is_empty())
    {
        out.push(format!("{at}: no responses"));
    }

    // Path parameters: declared (at the path or the operation), required, and in the path.
    let wanted = path_params(path);
    let mut declared = BTreeSet::new();
    let own: Vec<Value> = op
        .get("parameters")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for p in path_level.iter().chain(own.iter()) {
        let p = match deref(doc, p) {
            Ok(p) => p,
            Err(e) => {
                out.push(format!("{at}: parameter: {e}"));
                continue;
            }
        };
        if p.get("in").and_then(Value::as_str) != Some("path") {
            continue;
        }
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if !wanted.contains(name) {
            out.push(format!("{at}: path parameter {name:?} is not in the path"));
        }
        if p.get("required").and_then(Value::as_bool) != Some(true) {
            out.push(format!(
                "{at}: path parameter {name:?} is not marked required"
            ));
        }
        declared.insert(name.to_string());
    }
    for name in wanted.difference(&declared) {
        out.push(format!("{at}: path parameter {{{name}}} is not declared"));
    }

    // JSON request bodies: a Rust type and examples that parse into it.
    let Some(body) = op.get("requestBody") else {
        return;
    };
    let body = match deref(doc, body) {
        Ok(b) => b,
        Err(e) => {
            out.push(format!("{at}: requestBody: {e}"));
            return;
        }
    };
    let Some(content) = body.get("content").and_then(Value::as_object) else {
        out.push(format!("{at}: requestBody has no content"));
        return;
    };
    for (media_type, media) in content {
        if !is_json(media_type) {
            continue;
        }
        let at = format!("{at} ({media_type})");
        let schema = match media.get("schema").map(|s| deref(doc, s)) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                out.push(format!("{at}: schema: {e}"));
                continue;
            }
            None => {
                out.push(format!("{at}: no schema"));
                continue;
            }
        };
        let Some(type_name) = schema.get("x-rust-type").and_then(Value::as_str) else {
            out.push(format!("{at}: the body schema has no x-rust-type"));
            continue;
        };
        let Some(check) = rust_type(type_name) else {
            out.push(format!(
                "{at}: x-rust-type {type_name} is not a type this test knows; add it to rust_type()"
            ));
            continue;
        };
        let found = match examples(doc, media) {
            Ok(found) => found,
            Err(e) => {
                out.push(format!("{at}: {e}"));
                continue;
            }
        };
        if found.is_empty() {
            out.push(format!("{at}: the JSON body has no example"));
        }
        for (name, example) in found {
            if let Err(e) = check(example) {
                out.push(format!("{at}: {name} does not parse into {type_name}: {e}"));
            }
        }
    }
}

/// Everything wrong with `doc` against `routes`, one line each (empty when all is well).
fn problems(routes: &BTreeMap<Route, String>, doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if doc.get("openapi").and_then(Value::as_str) != Some("3.0.3") {
        out.push("the document is not `openapi: 3.0.3`".into());
    }
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        out.push("the document has no paths".into());
        return out;
    };
    let mut documented = BTreeSet::new();
    let mut operation_ids: BTreeMap<String, String> = BTreeMap::new();
    for (path, item) in paths {
        let Some(item) = item.as_object() else {
            out.push(format!("{path}: not a path item"));
            continue;
        };
        let path_level: Vec<Value> = item
            .get("parameters")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (key, op) in item {
            let method = key.as_str();
            if METHODS.contains(&method) || OTHER_METHODS.contains(&method) {
                documented.insert((path.clone(), method.to_string()));
                check_operation(doc, path, method, op, &path_level, &mut out);
                if let Some(id) = op.get("operationId").and_then(Value::as_str) {
                    let here = format!("{} {path}", method.to_uppercase());
                    if let Some(first) = operation_ids.insert(id.to_string(), here.clone()) {
                        out.push(format!("operationId {id} is used by {first} and {here}"));
                    }
                }
            } else if !matches!(method, "parameters" | "summary" | "description" | "servers")
                && !method.starts_with("x-")
            {
                out.push(format!("{path}: unknown key {method:?}"));
            }
        }
    }
    for (path, method) in routes.keys().filter(|r| !documented.contains(*r)) {
        out.push(format!(
            "route {} {path} is not in openapi.yaml",
            method.to_uppercase()
        ));
    }
    for (path, method) in documented.iter().filter(|r| !routes.contains_key(*r)) {
        out.push(format!(
            "openapi.yaml documents {} {path}, which is not a route",
            method.to_uppercase()
        ));
    }
    dangling_refs(doc, doc, "#", &mut out);
    let mut named = Vec::new();
    rust_type_names(doc, "#", &mut named);
    for (at, name) in named {
        match (rust_type(&name), rust_shape(&name)) {
            (Some(_), Some(shape)) => {
                if let Some(schema) = at.strip_prefix('#').and_then(|p| doc.pointer(p)) {
                    shape_problems(doc, schema, &shape, &format!("{at} ({name})"), &mut out);
                }
            }
            _ => out.push(format!(
                "{at}: x-rust-type {name:?} is not a type this test knows; add it to rust_type() and rust_shape()"
            )),
        }
    }
    out
}

// ---- Query parameters the handlers read ----------------------------------------------------

/// The `{ ... }` body of `struct name` in `src` (comments stripped), and the attributes
/// written just before it.
fn struct_body<'a>(src: &'a str, name: &str) -> Option<(&'a str, &'a str)> {
    let b = src.as_bytes();
    let mut from = 0;
    while let Some(found) = src[from..].find(&format!("struct {name}")) {
        let at = from + found;
        from = at + 1;
        let after = at + "struct ".len() + name.len();
        if b.get(after).is_some_and(|c| is_ident(*c)) {
            continue;
        }
        let open = after + src[after..].find('{')?;
        if !src[after..open].trim().is_empty() {
            continue;
        }
        let close = matching(b, open).ok()?;
        // The attributes: the text back to the end of the previous item.
        let before = &src[..at];
        let start = before.rfind(['}', ';']).map_or(0, |i| i + 1);
        return Some((&src[open + 1..close], &src[start..at]));
    }
    None
}

/// The query parameter names of the fields of a `Query<T>` struct body (serde renames
/// applied). Attributes this reader does not understand are an error.
fn query_fields(body: &str, attrs: &str) -> Result<BTreeSet<String>, String> {
    if attrs.contains("rename_all") || attrs.contains("flatten") {
        return Err("a serde rename_all or flatten on the query struct".into());
    }
    let mut names = BTreeSet::new();
    for field in split_fields(body)? {
        // `#[...]` attributes, then `pub name: Type`.
        let mut rest = field;
        let mut rename = None;
        while let Some(attr) = rest.strip_prefix("#[") {
            let close = matching(rest.as_bytes(), 1)?;
            let inner = &attr[..close - 2];
            if inner.contains("flatten") {
                return Err(format!("field {field:?} is flattened"));
            }
            if let Some(r) = inner.split("rename = \"").nth(1) {
                rename = r.split('"').next().map(str::to_string);
            }
            rest = rest[close + 1..].trim_start();
        }
        let rest = rest.strip_prefix("pub ").unwrap_or(rest);
        let name = rest
            .split(':')
            .next()
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.bytes().all(is_ident))
            .ok_or_else(|| format!("cannot read the field {field:?}"))?;
        names.insert(rename.unwrap_or_else(|| name.to_string()));
    }
    Ok(names)
}

/// The query parameters handler `module::function` reads: the fields of each `Query<T>` it
/// extracts, and `project` when it takes a `Scope` (which reads `?project=`). `module`
/// gives the source of `api/<module>.rs`.
fn handler_query_params(
    handler: &str,
    module: &dyn Fn(&str) -> Result<String, String>,
) -> Result<BTreeSet<String>, String> {
    let (file, func) = handler
        .split_once("::")
        .filter(|(m, f)| m.bytes().all(is_ident) && f.bytes().all(is_ident))
        .ok_or_else(|| format!("handler {handler:?} is not a `module::function` path"))?;
    let src = strip_comments(&module(file)?);
    let at = src
        .find(&format!("async fn {func}("))
        .ok_or_else(|| format!("no `async fn {func}(` in api/{file}.rs"))?;
    let open = at + src[at..].find('(').unwrap_or(0);
    let close = matching(src.as_bytes(), open)?;
    let signature = &src[open + 1..close];
    let mut params = BTreeSet::new();
    let words: Vec<&str> = signature
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    if words.contains(&"Scope") {
        params.insert("project".to_string());
    }
    let mut rest = signature;
    while let Some(i) = rest.find("Query<") {
        rest = &rest[i + "Query<".len()..];
        let ty = rest.split('>').next().unwrap_or("").trim();
        if !ty.bytes().all(is_ident) {
            return Err(format!("{handler}: cannot read the query type Query<{ty}>"));
        }
        // The struct is in the handler's file, or imported with `use super::other::{.., T}`.
        let (body, attrs) = match struct_body(&src, ty) {
            Some(found) => (found.0.to_string(), found.1.to_string()),
            None => {
                let other = src
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("use super::"))
                    .find(|l| {
                        l.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                            .any(|w| w == ty)
                    })
                    .and_then(|l| l.split("::").next())
                    .ok_or_else(|| format!("{handler}: struct {ty} not found"))?
                    .to_string();
                let other_src = strip_comments(&module(&other)?);
                let (b, a) = struct_body(&other_src, ty)
                    .ok_or_else(|| format!("{handler}: struct {ty} not found in api/{other}.rs"))?;
                (b.to_string(), a.to_string())
            }
        };
        params.extend(query_fields(&body, &attrs).map_err(|e| format!("{handler}: {ty}: {e}"))?);
    }
    Ok(params)
}

/// The `in: query` parameters documented for an operation (path-level ones included).
fn documented_query_params(doc: &Value, item: &Value, op: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for list in [item.get("parameters"), op.get("parameters")] {
        for p in list.and_then(Value::as_array).into_iter().flatten() {
            if let Ok(p) = deref(doc, p)
                && p.get("in").and_then(Value::as_str) == Some("query")
                && let Some(n) = p.get("name").and_then(Value::as_str)
            {
                names.insert(n.to_string());
            }
        }
    }
    names
}

/// For every route: the query parameters its handler reads are documented, and every
/// documented one is read.
fn query_problems(
    routes: &BTreeMap<Route, String>,
    doc: &Value,
    module: &dyn Fn(&str) -> Result<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for ((path, method), handler) in routes {
        let at = format!("{} {path}", method.to_uppercase());
        let Some(item) = doc.get("paths").and_then(|p| p.get(path)) else {
            continue;
        };
        let Some(op) = item.get(method) else {
            continue;
        };
        let read = match handler_query_params(handler, module) {
            Ok(read) => read,
            Err(e) => {
                out.push(format!(
                    "{at}: cannot tell which query parameters it reads: {e}"
                ));
                continue;
            }
        };
        let documented = documented_query_params(doc, item, op);
        for name in read.difference(&documented) {
            out.push(format!(
                "{at}: {handler} reads ?{name}= but openapi.yaml does not declare it"
            ));
        }
        for name in documented.difference(&read) {
            out.push(format!(
                "{at}: openapi.yaml declares ?{name}=, which {handler} does not read"
            ));
        }
    }
    out
}

/// Operations must say `security: []` exactly when their route is served without an API key,
/// and the document's default must be the bearer scheme.
fn security_problems(
    routes: &BTreeMap<Route, String>,
    open: &BTreeSet<Route>,
    doc: &Value,
) -> Vec<String> {
    let mut out = Vec::new();
    let bearer = doc.pointer("/components/securitySchemes/bearer");
    if bearer.and_then(|b| b.get("scheme")).and_then(Value::as_str) != Some("bearer") {
        out.push("components.securitySchemes.bearer is not an http bearer scheme".into());
    }
    if doc.get("security") != Some(&serde_json::json!([{"bearer": []}])) {
        out.push("the document's security is not [{bearer: []}]".into());
    }
    for (path, method) in routes.keys() {
        let Some(op) = doc.pointer(&format!(
            "/paths/{}/{method}",
            path.replace('~', "~0").replace('/', "~1")
        )) else {
            continue;
        };
        let at = format!("{} {path}", method.to_uppercase());
        let documented_open = op.get("security") == Some(&serde_json::json!([]));
        let is_open = open.contains(&(path.clone(), method.clone()));
        if is_open && !documented_open {
            out.push(format!(
                "{at} is served without an API key but openapi.yaml does not say `security: []`"
            ));
        }
        if !is_open && documented_open {
            out.push(format!(
                "{at} needs an API key but openapi.yaml says `security: []`"
            ));
        }
    }
    out
}

fn load_doc(text: &str) -> Result<Value, String> {
    serde_yaml::from_str::<Value>(text).map_err(|e| format!("openapi.yaml is not valid: {e}"))
}

// ---- The tests ---------------------------------------------------------------------------

#[test]
fn openapi_yaml_documents_exactly_the_router() {
    let routes = routes_from_source(&repo_file("controller/src/api/mod.rs"))
        .unwrap_or_else(|e| panic!("cannot read the routes of api/mod.rs: {e}"));
    let doc = load_doc(&repo_file("docs/api/openapi.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let mut found = problems(&routes, &doc);
    let module = |name: &str| -> Result<String, String> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("src/api/{name}.rs"));
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    found.extend(query_problems(&routes, &doc, &module));
    let open = open_routes_from_source(&repo_file("controller/src/api/mod.rs"))
        .unwrap_or_else(|e| panic!("cannot tell which routes are open: {e}"));
    found.extend(security_problems(&routes, &open, &doc));
    assert!(
        found.is_empty(),
        "docs/api/openapi.yaml and the router disagree ({} problems):\n  {}",
        found.len(),
        found.join("\n  ")
    );
}

#[test]
fn the_router_source_is_read_whole() {
    // Both routers (the authenticated one and the open one) are seen, with every method.
    let routes = routes_from_source(&repo_file("controller/src/api/mod.rs")).unwrap();
    for (path, method) in [
        ("/", "get"),
        ("/1.0/cluster/join", "post"),
        ("/1.0/cluster/join-controller", "post"),
        ("/1.0/instances/{name}", "post"),
        ("/1.0/instances/{name}", "delete"),
        ("/1.0/images/aliases/{alias}", "get"),
        ("/1.0/keys/{name}/rotate", "post"),
    ] {
        assert!(
            routes.contains_key(&(path.to_string(), method.to_string())),
            "{method} {path} not found in {routes:?}"
        );
    }
    assert!(routes.len() > 50, "only {} routes read", routes.len());
}

// The checks themselves must be able to fail: each of these breaks one rule on purpose.

const SAMPLE_ROUTER: &str = r#"
pub fn router(state: SharedState) -> Router {
    // .route("/commented/out", get(nothing))
    let authed = Router::new()
        .route("/1.0/things", get(things::list).post(things::create))
        .route("/1.0/things/{name}", get(things::get_one).delete(things::delete))
        .layer(middleware::from_fn(auth));
    Router::new()
        .route("/1.0/files/{*path}", axum::routing::put(|b: String| async move { b.len().to_string() }))
        .merge(authed)
        .with_state(state)
}
"#;

fn sample_doc() -> Value {
    load_doc(
        r##"
openapi: 3.0.3
info: {title: t, version: "1"}
paths:
  /1.0/things:
    get:
      summary: List things
      description: All the things.
      responses: {"200": {description: ok}}
    post:
      summary: Make a thing
      description: A new thing.
      requestBody:
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Rename"}
            example: {name: web}
      responses: {"200": {description: ok}}
  /1.0/things/{name}:
    parameters:
      - {name: name, in: path, required: true, schema: {type: string}}
    get:
      summary: Show a thing
      description: One thing.
      responses: {"200": {description: ok}}
    delete:
      summary: Delete a thing
      description: Gone.
      responses: {"200": {description: ok}}
  /1.0/files/{path}:
    put:
      summary: Put a file
      description: Writes it.
      parameters:
        - {name: path, in: path, required: true, schema: {type: string}}
      responses: {"200": {description: ok}}
components:
  schemas:
    Rename:
      x-rust-type: berth_proto::api::tenancy::RenamePost
      type: object
"##,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn sample_problems(edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let routes = routes_from_source(SAMPLE_ROUTER).unwrap_or_else(|e| panic!("{e}"));
    let mut doc = sample_doc();
    edit(&mut doc);
    problems(&routes, &doc)
}

#[test]
fn the_sample_router_is_read_as_written() {
    let routes = routes_from_source(SAMPLE_ROUTER).unwrap();
    let want: BTreeSet<Route> = [
        ("/1.0/things", "get"),
        ("/1.0/things", "post"),
        ("/1.0/things/{name}", "get"),
        ("/1.0/things/{name}", "delete"),
        ("/1.0/files/{path}", "put"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(routes.keys().cloned().collect::<BTreeSet<_>>(), want);
    assert_eq!(sample_problems(|_| {}), Vec::<String>::new());
}

#[test]
fn a_route_missing_from_the_document_fails() {
    let found = sample_problems(|d| {
        d["paths"]["/1.0/things/{name}"]
            .as_object_mut()
            .unwrap()
            .remove("delete");
    });
    assert_eq!(
        found,
        ["route DELETE /1.0/things/{name} is not in openapi.yaml"]
    );
}

#[test]
fn a_documented_operation_without_a_route_fails() {
    let found = sample_problems(|d| {
        d["paths"]["/1.0/things"]["patch"] = d["paths"]["/1.0/things"]["get"].clone();
        d["paths"]["/1.0/things"]["patch"]["operationId"] = "x".into();
    });
    assert_eq!(
        found,
        ["openapi.yaml documents PATCH /1.0/things, which is not a route"]
    );
}

#[test]
fn missing_summaries_descriptions_and_path_parameters_fail() {
    let found = sample_problems(|d| {
        let get = &mut d["paths"]["/1.0/things"]["get"];
        get.as_object_mut().unwrap().remove("summary");
        get["description"] = " ".into();
        d["paths"]["/1.0/files/{path}"]["put"]
            .as_object_mut()
            .unwrap()
            .remove("parameters");
    });
    assert_eq!(
        found,
        [
            "PUT /1.0/files/{path}: path parameter {path} is not declared",
            "GET /1.0/things: no summary",
            "GET /1.0/things: no description",
        ]
    );
}

#[test]
fn an_example_that_does_not_parse_fails() {
    let found = sample_problems(|d| {
        d["paths"]["/1.0/things"]["post"]["requestBody"]["content"]["application/json"]["example"] =
            serde_json::json!({"name": "web", "extra": 1});
    });
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("POST /1.0/things (application/json): example does not parse into berth_proto::api::tenancy::RenamePost: unknown field `extra`"),
        "{found:?}"
    );
}

#[test]
fn an_unknown_rust_type_or_a_body_without_example_fails() {
    let found = sample_problems(|d| {
        d["components"]["schemas"]["Rename"]["x-rust-type"] = "berth_proto::api::Nope".into();
    });
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found.iter().all(|f| f.contains("berth_proto::api::Nope")),
        "{found:?}"
    );

    let found = sample_problems(|d| {
        d["paths"]["/1.0/things"]["post"]["requestBody"]["content"]["application/json"]
            .as_object_mut()
            .unwrap()
            .remove("example");
    });
    assert_eq!(
        found,
        ["POST /1.0/things (application/json): the JSON body has no example"]
    );
}

#[test]
fn routers_this_test_cannot_read_fail() {
    let nested = SAMPLE_ROUTER.replace(".merge(authed)", ".nest(\"/x\", authed)");
    assert!(routes_from_source(&nested).unwrap_err().contains("nest"));
    let any = SAMPLE_ROUTER.replace("get(things::list)", "any(things::list)");
    assert!(routes_from_source(&any).unwrap_err().contains("`any(`"));
}

const SAMPLE_MODULE: &str = r#"
#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    recursion: u8,
    /// Every project's things.
    #[serde(default, rename = "all-projects")]
    all_projects: bool,
}

/// `GET /1.0/things`.
pub async fn list(
    State(state): State<SharedState>,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    todo!()
}
"#;

#[test]
fn query_parameters_are_checked_against_the_handler() {
    let routes = routes_from_source(
        "fn router() { Router::new().route(\"/1.0/things\", get(things::list)) }",
    )
    .unwrap();
    let module = |name: &str| -> Result<String, String> {
        match name {
            "things" => Ok(SAMPLE_MODULE.to_string()),
            other => Err(format!("no module {other}")),
        }
    };
    let doc = |params: &str| {
        load_doc(&format!(
            "openapi: 3.0.3\npaths:\n  /1.0/things:\n    get:\n      parameters: {params}\n"
        ))
        .unwrap()
    };
    let all = "[{name: project, in: query}, {name: recursion, in: query}, {name: all-projects, in: query}]";
    assert_eq!(
        query_problems(&routes, &doc(all), &module),
        Vec::<String>::new()
    );
    let found = query_problems(
        &routes,
        &doc(
            "[{name: project, in: query}, {name: recursion, in: query}, {name: filter, in: query}]",
        ),
        &module,
    );
    assert_eq!(
        found,
        [
            "GET /1.0/things: things::list reads ?all-projects= but openapi.yaml does not declare it",
            "GET /1.0/things: openapi.yaml declares ?filter=, which things::list does not read",
        ]
    );
    let flattened = SAMPLE_MODULE.replace("#[serde(default)]", "#[serde(flatten)]");
    let module = |_: &str| -> Result<String, String> { Ok(flattened.clone()) };
    let found = query_problems(&routes, &doc(all), &module);
    assert!(
        found.len() == 1 && found[0].contains("flattened"),
        "{found:?}"
    );
}

#[test]
fn open_routes_are_those_outside_the_authenticated_router() {
    let src = repo_file("controller/src/api/mod.rs");
    let open = open_routes_from_source(&src).unwrap();
    let want: BTreeSet<Route> = [
        ("/", "get"),
        ("/1.0/cluster/join", "post"),
        ("/1.0/cluster/join-controller", "post"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(open, want);

    // An open route documented as needing a key, and the reverse, both fail.
    let routes = routes_from_source(&src).unwrap();
    let mut doc = load_doc(&repo_file("docs/api/openapi.yaml")).unwrap();
    doc["paths"]["/"]["get"]
        .as_object_mut()
        .unwrap()
        .remove("security");
    doc["paths"]["/1.0/metrics"]["get"]["security"] = serde_json::json!([]);
    assert_eq!(
        security_problems(&routes, &open, &doc),
        [
            "GET / is served without an API key but openapi.yaml does not say `security: []`",
            "GET /1.0/metrics needs an API key but openapi.yaml says `security: []`",
        ]
    );
}

#[test]
fn schemas_must_list_exactly_the_fields_of_their_rust_type() {
    let routes = routes_from_source(&repo_file("controller/src/api/mod.rs")).unwrap();
    let mut doc = load_doc(&repo_file("docs/api/openapi.yaml")).unwrap();
    doc["components"]["schemas"]["InstanceExecPost"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("record-output");
    doc["components"]["schemas"]["InstancesPost"]["properties"]["source"]["properties"]["size"] =
        serde_json::json!({"type": "integer"});
    doc["components"]["schemas"]["ClusterPatch"]["properties"]["labels"] =
        serde_json::json!({"type": "object"});
    let found = problems(&routes, &doc);
    assert_eq!(
        found,
        [
            "#/components/schemas/ClusterPatch (berth_controller::api::cluster::ClusterPatch): property \"labels\" is not a field of the Rust type",
            "#/components/schemas/InstanceExecPost (berth_proto::api::InstanceExecPost): field \"record-output\" of the Rust type is not documented",
            "#/components/schemas/InstancesPost (berth_proto::api::InstancesPost).source: property \"size\" is not a field of the Rust type",
        ]
    );
}

//! Tenants on one cluster: projects with quotas, scoped API keys, profiles, and the API
//! conventions automation relies on (ETag/If-Match, Idempotency-Key), end to end with real
//! instances. Then `berth apply` on the example stack of `docs/`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_tests::Cluster;
use serde_json::{Value, json};

type Answer = (u16, BTreeMap<String, String>, Value);

struct Api<'a> {
    c: &'a Cluster,
    key: String,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Answer> {
        let body = body.map(|b| b.to_string());
        self.c
            .curl(Some(&self.key), method, path, body.as_deref(), &[])
    }

    fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[&str],
    ) -> Result<Answer> {
        let body = body.map(|b| b.to_string());
        self.c
            .curl(Some(&self.key), method, path, body.as_deref(), headers)
    }

    /// A call that must answer `code`.
    fn expect(&self, code: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (got, _, v) = self.call(method, path, body)?;
        if got != code {
            bail!(
                "{method} {path} as {}: expected {code}, got {got}: {v}",
                self.key_name()
            );
        }
        Ok(v)
    }

    fn key_name(&self) -> &str {
        self.key.get(..14).unwrap_or(&self.key)
    }

    /// Runs an async request and waits for its operation; returns the finished operation.
    fn run(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let v = self.expect(202, method, path, body)?;
        let id = v["metadata"]["id"]
            .as_str()
            .context("async answer without operation id")?
            .to_string();
        let op = self.expect(
            200,
            "GET",
            &format!("/1.0/operations/{id}/wait?timeout=60"),
            None,
        )?;
        if op["metadata"]["status"] != "Success" {
            bail!("operation {id} did not succeed: {op}");
        }
        Ok(op["metadata"].clone())
    }
}

/// Reads what a killed child wrote to its stdout.
trait ChildOutput {
    fn wait_with_output_ref(&mut self) -> Result<String>;
}

impl ChildOutput for std::process::Child {
    fn wait_with_output_ref(&mut self) -> Result<String> {
        use std::io::Read;
        let mut out = String::new();
        if let Some(mut s) = self.stdout.take() {
            s.read_to_string(&mut out)?;
        }
        self.wait()?;
        Ok(out)
    }
}

fn launch_body(name: &str) -> Value {
    json!({"name": name, "source": {"type": "image", "alias": "busybox"}, "start": true})
}

/// Creates a key as admin; returns its secret.
fn make_key(admin: &Api, name: &str, role: &str, project: &str) -> Result<String> {
    let v = admin.expect(
        200,
        "POST",
        "/1.0/keys",
        Some(json!({"name": name, "role": role, "project": project})),
    )?;
    Ok(v["metadata"]["secret"]
        .as_str()
        .context("no secret in the key answer")?
        .to_string())
}

#[test]
fn tenants_are_isolated_and_held_to_their_quotas() -> Result<()> {
    let c = Cluster::start()?;
    let admin = Api {
        c: &c,
        key: c.admin_key()?,
    };
    c.berth_ok(&["image", "build", "busybox"])?;
    admin.expect(
        200,
        "POST",
        "/1.0/projects",
        Some(json!({"name": "a", "config": {"limits.instances": "2"}})),
    )?;
    admin.expect(200, "POST", "/1.0/projects", Some(json!({"name": "b"})))?;
    // A bad quota changes nothing.
    for bad in ["-1", "lots"] {
        let v = admin.expect(
            400,
            "PATCH",
            "/1.0/projects/a",
            Some(json!({"config": {"limits.instances": bad}})),
        )?;
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("limits.instances"),
            "{v}"
        );
    }
    let alice = Api {
        c: &c,
        key: make_key(&admin, "alice", "member", "a")?,
    };
    let val = Api {
        c: &c,
        key: make_key(&admin, "val", "viewer", "a")?,
    };
    let bob = Api {
        c: &c,
        key: make_key(&admin, "bob", "member", "b")?,
    };

    // Events: the admin watches every project; bob watches his own.
    let mut watch_all = c.berth_spawn(&["monitor", "--all-projects", "--format", "json"], &[])?;
    let bob_key = tempfile::NamedTempFile::new()?;
    std::fs::write(bob_key.path(), &bob.key)?;
    let (url, bob_key_path, ca) = (
        c.api_url(),
        bob_key.path().display().to_string(),
        c.ca_file().display().to_string(),
    );
    let mut watch_bob = c.berth_spawn(
        &["monitor", "--format", "json"],
        &[
            ("BERTH_URL", url.as_str()),
            ("BERTH_KEY_FILE", bob_key_path.as_str()),
            ("BERTH_CA", ca.as_str()),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));

    // Alice launches in her project without naming it.
    let op = alice.run("POST", "/1.0/instances", Some(launch_body("web")))?;
    let op_id = op["id"].as_str().unwrap_or_default().to_string();
    let v = alice.expect(200, "GET", "/1.0/instances/web", None)?;
    assert_eq!(v["metadata"]["project"], "a");
    // Its hostname is its own name, not the node-local scoped one.
    let (code, out, err) = c.exec_in("a", "web", &["hostname"])?;
    assert_eq!((code, out.trim()), (0, "web"), "{err}");

    // Bob sees nothing of project a, whatever the endpoint: 404 as if it did not exist.
    for (method, path, body) in [
        ("GET", "/1.0/instances/web", None),
        ("GET", "/1.0/instances/web?project=a", None),
        ("GET", "/1.0/instances/web/state", None),
        (
            "PUT",
            "/1.0/instances/web/state",
            Some(json!({"action": "stop"})),
        ),
        ("DELETE", "/1.0/instances/web", None),
        (
            "PATCH",
            "/1.0/instances/web",
            Some(json!({"description": "x"})),
        ),
        (
            "POST",
            "/1.0/instances/web/exec",
            Some(json!({"command": ["true"], "wait-for-websocket": true})),
        ),
        ("GET", "/1.0/instances/web/files?path=/etc/hostname", None),
        ("GET", "/1.0/instances/web/console", None),
        ("GET", &format!("/1.0/operations/{op_id}"), None),
        ("GET", "/1.0/projects/a", None),
        ("GET", "/1.0/projects/a/state", None),
        ("GET", "/1.0/profiles?project=a", None),
        ("GET", "/1.0/profiles/default?project=a", None),
        ("GET", "/1.0/instances?project=a", None),
        ("GET", "/1.0/operations?project=a", None),
        ("GET", "/1.0/images/aliases?project=a", None),
        ("GET", "/1.0/events?project=a", None),
    ] {
        let (code, _, v) = bob.call(method, path, body)?;
        assert_eq!(code, 404, "bob {method} {path}: {v}");
        assert!(
            !v.to_string().contains("a_web"),
            "a 404 names the scoped name: {v}"
        );
    }
    let list = bob.expect(200, "GET", "/1.0/instances?recursion=1", None)?;
    assert_eq!(list["metadata"], json!([]), "bob lists a's instances");
    // The same name in his own project is his, with no conflict.
    bob.run("POST", "/1.0/instances", Some(launch_body("web")))?;
    let (code, out, _) = c.exec_in("b", "web", &["hostname"])?;
    assert_eq!((code, out.trim()), (0, "web"));
    // Every change is an event naming the key that asked; bob saw only his project's.
    std::thread::sleep(Duration::from_millis(500));
    let events = |child: &mut std::process::Child| -> Result<Vec<Value>> {
        let _ = child.kill();
        let out = child.wait_with_output_ref()?;
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect())
    };
    let all = events(&mut watch_all)?;
    let created_by = |evs: &[Value], project: &str| {
        evs.iter()
            .filter(|e| e["project"] == project && e["metadata"]["action"] == "instance-created")
            .map(|e| e["metadata"]["requestor"]["key"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(created_by(&all, "a"), [json!("alice")], "{all:?}");
    assert_eq!(created_by(&all, "b"), [json!("bob")], "{all:?}");
    let seen_by_bob = events(&mut watch_bob)?;
    assert!(!seen_by_bob.is_empty(), "bob saw no events at all");
    assert!(
        seen_by_bob.iter().all(|e| e["project"] == "b"),
        "bob saw another project's events: {seen_by_bob:?}"
    );

    // Members may not manage keys or the fleet; they may read an unrestricted cluster.
    alice.expect(403, "GET", "/1.0/keys", None)?;
    alice.expect(
        403,
        "POST",
        "/1.0/cluster/join-tokens",
        Some(json!({"name": "x"})),
    )?;
    alice.expect(200, "GET", "/1.0/cluster", None)?;

    // The viewer reads project a and changes nothing.
    val.expect(200, "GET", "/1.0/instances/web", None)?;
    for (method, path, body) in [
        (
            "PUT",
            "/1.0/instances/web/state",
            Some(json!({"action": "stop"})),
        ),
        ("DELETE", "/1.0/instances/web", None),
        (
            "POST",
            "/1.0/instances/web/exec",
            Some(json!({"command": ["true"], "wait-for-websocket": true})),
        ),
        ("POST", "/1.0/instances", Some(launch_body("v1"))),
    ] {
        let (code, _, v) = val.call(method, path, body)?;
        assert_eq!(code, 403, "viewer {method} {path}: {v}");
    }

    // Quota: exactly at the limit, then one over.
    alice.run("POST", "/1.0/instances", Some(launch_body("web2")))?;
    let v = alice.expect(403, "POST", "/1.0/instances", Some(launch_body("web3")))?;
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("limits.instances quota of 2 instances")
            && msg.contains("2 instances are in use"),
        "{msg}"
    );
    assert_eq!(
        alice.expect(404, "GET", "/1.0/instances/web3", None)?["type"],
        "error"
    );
    // Two launches race for the last slot: exactly one wins.
    admin.expect(
        200,
        "PATCH",
        "/1.0/projects/a",
        Some(json!({"config": {"limits.instances": "3"}})),
    )?;
    let codes: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = ["race1", "race2"]
            .iter()
            .map(|n| {
                let alice = &alice;
                s.spawn(move || {
                    alice
                        .call("POST", "/1.0/instances", Some(launch_body(n)))
                        .map(|a| a.0)
                        .unwrap_or(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(sorted, [202, 403], "racing launches: {codes:?}");
    let state = alice.expect(200, "GET", "/1.0/projects/a/state", None)?;
    assert_eq!(
        state["metadata"]["resources"]["instances"],
        json!({"limit": 3, "usage": 3})
    );

    // A disk limit is enforced by btrfs quotas, and the instance's state reports its use.
    let (code, _, v) = alice.call(
        "PATCH",
        "/1.0/instances/web",
        Some(json!({"config": {"limits.disk": "256MiB"}})),
    )?;
    assert!(code < 300, "{v}");
    let disk = || -> Result<Value> {
        Ok(
            alice.expect(200, "GET", "/1.0/instances/web/state", None)?["metadata"]["disk"]["root"]
                .clone(),
        )
    };
    berth_tests::wait_for("the disk use in the state", Duration::from_secs(10), || {
        disk().is_ok_and(|d| d["usage"].as_u64().unwrap_or(0) > 0)
    })?;
    assert_eq!(disk()?["total"], json!(256u64 << 20));

    // ETag / If-Match: a stale write is refused and changes nothing.
    let (code, head, _) = alice.call("GET", "/1.0/instances/web", None)?;
    assert_eq!(code, 200);
    let etag = head.get("etag").context("no ETag header")?.clone();
    let if_match = format!("If-Match: {etag}");
    let (code, _, v) = alice.call_with(
        "PATCH",
        "/1.0/instances/web",
        Some(json!({"description": "first"})),
        &[&if_match],
    )?;
    assert!(code == 200 || code == 202, "{v}");
    let (code, _, v) = alice.call_with(
        "PATCH",
        "/1.0/instances/web",
        Some(json!({"description": "second"})),
        &[&if_match],
    )?;
    assert_eq!(code, 412, "{v}");
    let v = alice.expect(200, "GET", "/1.0/instances/web", None)?;
    assert_eq!(v["metadata"]["description"], "first");

    // Idempotency-Key: a retry returns the first answer and does nothing twice; the same key
    // with another body is a 422.
    let idem = "Idempotency-Key: create-small-1";
    let body = json!({"name": "small", "config": {"limits.memory": "96MiB"}});
    let first = alice.call_with("POST", "/1.0/profiles", Some(body.clone()), &[idem])?;
    let again = alice.call_with("POST", "/1.0/profiles", Some(body), &[idem])?;
    assert_eq!(first.0, again.0, "{:?} vs {:?}", first.2, again.2);
    assert!(first.0 < 300, "{:?}", first.2);
    assert_eq!(first.2, again.2);
    let (code, _, v) = alice.call_with(
        "POST",
        "/1.0/profiles",
        Some(json!({"name": "other"})),
        &[idem],
    )?;
    assert_eq!(code, 422, "{v}");
    alice.expect(404, "GET", "/1.0/profiles/other", None)?;

    // Profiles are live: assigning one and changing it changes the running instance's cgroup.
    alice
        .run(
            "PATCH",
            "/1.0/instances/web",
            Some(json!({"profiles": ["default", "small"]})),
        )
        .or_else(|_| {
            alice
                .expect(
                    200,
                    "PATCH",
                    "/1.0/instances/web",
                    Some(json!({"profiles": ["default", "small"]})),
                )
                .map(|_| Value::Null)
        })?;
    let limit_file = format!(
        "/sys/fs/cgroup/memory/{}/memory.limit_in_bytes",
        c.cgroup_name("a_web")
    );
    let limit = || {
        std::fs::read_to_string(&limit_file)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(limit(), (96u64 << 20).to_string());
    let (code, _, v) = alice.call(
        "PATCH",
        "/1.0/profiles/small",
        Some(json!({"config": {"limits.memory": "80MiB"}})),
    )?;
    assert!(code < 300, "{v}");
    berth_tests::wait_for("the profile's new limit", Duration::from_secs(10), || {
        limit() == (80u64 << 20).to_string()
    })?;

    // Restricted projects: no --target, no node listing.
    admin.expect(
        200,
        "PATCH",
        "/1.0/projects/a",
        Some(json!({"config": {"restricted": "true"}})),
    )?;
    alice.expect(403, "GET", "/1.0/cluster/members", None)?;
    let node = berth_tests::node_name();
    alice.expect(
        403,
        "POST",
        &format!("/1.0/instances?target={node}"),
        Some(launch_body("pinned")),
    )?;
    // A key that is revoked stops working at once, with the same 401 as a wrong one.
    admin.expect(200, "DELETE", "/1.0/keys/bob", None)?;
    let (code, _, v) = bob.call("GET", "/1.0/instances", None)?;
    assert_eq!(code, 401, "{v}");
    Ok(())
}

#[test]
fn apply_converges_reports_drift_and_destroys() -> Result<()> {
    let c = Cluster::start()?;
    c.berth_ok(&["image", "build", "busybox"])?;
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/stack.yaml");
    let out = c.berth_ok(&["apply", "-f", stack])?;
    assert!(
        out.contains("Plan: 6 to create, 1 to update in place"),
        "{out}"
    );
    let list = c.berth_ok(&["list", "--project", "shop", "--format", "json"])?;
    let list: Value = serde_json::from_str(&list)?;
    let status = |name: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == name))
            .map(|i| i["status"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(status("web1").as_deref(), Some("Running"), "{list}");
    assert_eq!(status("batch").as_deref(), Some("Stopped"), "{list}");

    // A second apply changes nothing.
    let out = c.berth_ok(&["apply", "-f", stack])?;
    assert!(out.contains("No changes"), "{out}");
    let plan = c.berth(&["apply", "-f", stack, "--plan", "--detailed-exitcode"])?;
    assert_eq!(plan.status.code(), Some(0));

    // Drift: an instance stopped by hand shows in the plan, exactly, and the next apply
    // starts it again.
    c.berth_ok(&["stop", "--project", "shop", "--force", "web1"])?;
    let plan = c.berth(&["apply", "-f", stack, "--plan", "--detailed-exitcode"])?;
    let text = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert_eq!(plan.status.code(), Some(2), "{text}");
    assert!(
        text.contains("update   instance shop/web1 (in place: state stopped -> running)"),
        "{text}"
    );
    assert!(
        text.contains("Plan: 0 to create, 1 to update in place"),
        "{text}"
    );
    c.berth_ok(&["apply", "-f", stack])?;
    let list = c.berth_ok(&["list", "--project", "shop", "--format", "json"])?;
    assert!(list.contains("Running"), "{list}");

    // A change in place and a replace: web2 gets a new key, batch another image.
    let work = tempfile::tempdir()?;
    berth_tests::make_image(work.path())?;
    let unified = work.path().join("unified.tar.xz").display().to_string();
    c.berth_ok(&["image", "import", &unified, "--alias", "other"])?;
    let before = c.berth_ok(&["list", "--project", "shop", "--format", "json"])?;
    let image_of = |list: &str, name: &str| -> Result<String> {
        let v: Value = serde_json::from_str(list)?;
        v.as_array()
            .and_then(|l| l.iter().find(|i| i["name"] == name))
            .and_then(|i| i["image"].as_str().map(str::to_string))
            .with_context(|| format!("{name} not listed: {list}"))
    };
    let changed = std::fs::read_to_string(stack)?
        .replace(
            "    profiles: [default, web]\n  - name: batch",
            "    profiles: [default, web]\n    config:\n      user.note: changed\n  - name: batch",
        )
        .replace(
            "  - name: batch\n    project: shop\n    image: busybox",
            "  - name: batch\n    project: shop\n    image: other",
        );
    let changed_file = work.path().join("changed.yaml");
    std::fs::write(&changed_file, &changed)?;
    let changed_path = changed_file.display().to_string();
    let plan = c.berth(&[
        "apply",
        "-f",
        &changed_path,
        "--plan",
        "--detailed-exitcode",
    ])?;
    let text = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert_eq!(plan.status.code(), Some(2), "{text}");
    assert!(
        text.contains("update   instance shop/web2 (in place: config user.note)"),
        "{text}"
    );
    assert!(
        text.contains("replace  instance shop/batch (image changed from busybox to other)"),
        "{text}"
    );
    assert!(
        text.contains("Plan: 0 to create, 1 to update in place, 1 to replace, 0 to delete."),
        "{text}"
    );
    c.berth_ok(&["apply", "-f", &changed_path])?;
    let after = c.berth_ok(&["list", "--project", "shop", "--format", "json"])?;
    assert_ne!(image_of(&before, "batch")?, image_of(&after, "batch")?);
    assert_eq!(image_of(&before, "web2")?, image_of(&after, "web2")?);
    let out = c.berth_ok(&["apply", "-f", &changed_path])?;
    assert!(out.contains("No changes"), "{out}");
    // A replace whose new image does not exist changes nothing (checked before any change).
    let broken = changed.replace("    image: other", "    image: nosuchimage");
    std::fs::write(&changed_file, &broken)?;
    let err = c.berth_err(&["apply", "-f", &changed_path])?;
    assert!(
        err.contains("instance shop/batch: image nosuchimage not found"),
        "{err}"
    );
    let still = c.berth_ok(&["list", "--project", "shop", "--format", "json"])?;
    assert_eq!(image_of(&after, "batch")?, image_of(&still, "batch")?);
    // Back to the file in docs/ for the checks below.
    c.berth_ok(&["apply", "-f", stack])?;

    // A stack that is not a stack: the line and column, nothing changed.
    let bad = tempfile::NamedTempFile::new()?;
    std::fs::write(
        bad.path(),
        "stack: shop\ninstances:\n  - name: x\n    imgae: busybox\n",
    )?;
    let err = c.berth_err(&["apply", "-f", &bad.path().display().to_string()])?;
    assert!(err.contains("line 4"), "{err}");

    let out = c.berth_ok(&["destroy", "-f", stack])?;
    assert!(out.contains("Destroyed"), "{out}");
    let projects = c.berth_ok(&["project", "list", "--format", "json"])?;
    assert!(!projects.contains("\"shop\""), "{projects}");
    Ok(())
}

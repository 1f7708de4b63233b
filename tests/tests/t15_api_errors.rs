//! The REST API refuses what it must: no key or a wrong key (401, nothing else), bodies that
//! are not JSON or too large, unknown keys and bad values — each with one sentence, changing nothing.

use std::process::Command;

use berth_tests::Cluster;

/// `curl` against the cluster: (HTTP status, body).
fn curl(
    c: &Cluster,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg("--cacert")
        .arg(c.ca_file())
        .arg(format!("{}{path}", c.api_url()));
    if let Some(k) = key {
        cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    let file = tempfile::NamedTempFile::new()?;
    if let Some(b) = body {
        std::fs::write(file.path(), b)?;
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", file.path().display()));
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let value = serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string()));
    Ok((code.trim().parse()?, value))
}

#[test]
fn api_refuses_bad_requests() -> anyhow::Result<()> {
    let c = Cluster::start()?;
    let key = c.admin_key()?;
    let key = Some(key.as_str());

    // Authentication: nothing but 401 without a valid key.
    for k in [None, Some("wrong"), Some("")] {
        let (code, body) = curl(&c, k, "GET", "/1.0/instances", None)?;
        assert_eq!(code, 401, "{body}");
        assert_eq!(body["type"], "error");
        assert_eq!(
            body["metadata"],
            serde_json::Value::Null,
            "a 401 reveals nothing"
        );
    }
    let (code, _) = curl(&c, Some("wrong"), "POST", "/1.0/instances", Some("{}"))?;
    assert_eq!(code, 401);
    let (code, body) = curl(&c, key, "GET", "/1.0", None)?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["metadata"]["api_version"], "1.0");

    c.berth_ok(&["image", "build", "busybox"])?;
    let launch = |body: &str| curl(&c, key, "POST", "/1.0/instances", Some(body));
    let cases = [
        ("not json", "not valid JSON"),
        ("{\"name\": \"x\"}", "missing field `source`"),
        (
            "{\"name\": \"t15-a\", \"source\": {\"type\": \"image\", \"alias\": \"busybox\"}, \"bogus\": 1}",
            "unknown field `bogus`",
        ),
        (
            "{\"name\": \"-bad\", \"source\": {\"type\": \"image\", \"alias\": \"busybox\"}}",
            "must not start",
        ),
        (
            "{\"name\": \"t15-a\", \"source\": {\"type\": \"image\", \"alias\": \"nope\"}}",
            "not found",
        ),
        (
            "{\"name\": \"t15-a\", \"source\": {\"type\": \"image\", \"alias\": \"busybox\"}, \"config\": {\"limits.memory\": \"1x\"}}",
            "limits.memory",
        ),
        (
            "{\"name\": \"t15-a\", \"source\": {\"type\": \"image\", \"alias\": \"busybox\"}, \"config\": {\"limits.nope\": \"1\"}}",
            "unknown config key",
        ),
        (
            "{\"name\": \"t15-a\", \"source\": {\"type\": \"copy\"}}",
            "names no instance",
        ),
        (
            "{\"name\": \"t15-a\", \"source\": {\"type\": \"migration\"}}",
            "not supported",
        ),
    ];
    for (body, needle) in cases {
        let (code, resp) = launch(body)?;
        assert!((400..500).contains(&code), "{body}: {code} {resp}");
        let msg = resp["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(!msg.contains('\n'), "one sentence: {msg}");
    }
    // Too large.
    let big = format!(
        "{{\"name\": \"t15-a\", \"description\": \"{}\"}}",
        "x".repeat(2 << 20)
    );
    let (code, _) = launch(&big)?;
    assert_eq!(code, 413);
    // Nothing was created.
    let (_, list) = curl(&c, key, "GET", "/1.0/instances", None)?;
    assert_eq!(list["metadata"], serde_json::json!([]), "{list}");

    // Unknown paths and objects.
    let (code, _) = curl(&c, key, "GET", "/1.0/nothing-here", None)?;
    assert_eq!(code, 404);
    let (code, body) = curl(&c, key, "GET", "/1.0/instances/ghost", None)?;
    assert_eq!(code, 404, "{body}");
    let (code, _) = curl(&c, key, "GET", "/1.0/operations/ghost", None)?;
    assert_eq!(code, 404);
    // Even a malformed query string gets the envelope.
    let (code, body) = curl(&c, key, "GET", "/1.0/instances?recursion=300", None)?;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["type"], "error", "{body}");

    // A good create, then bad updates that change nothing.
    c.berth_ok(&["init", "busybox", "t15-a", "-c", "limits.memory=128MiB"])?;
    let (code, body) = curl(
        &c,
        key,
        "PATCH",
        "/1.0/instances/t15-a",
        Some("{\"config\": {\"limits.memory\": \"-5\"}}"),
    )?;
    assert_eq!(code, 400, "{body}");
    let (code, _) = curl(
        &c,
        key,
        "PATCH",
        "/1.0/instances/t15-a",
        Some("{\"config\": {\"volatile.x\": \"1\"}}"),
    )?;
    assert_eq!(code, 400);
    let (code, _) = curl(
        &c,
        key,
        "PUT",
        "/1.0/instances/t15-a/state",
        Some("{\"action\": \"dance\"}"),
    )?;
    assert_eq!(code, 400);
    let (code, _) = curl(
        &c,
        key,
        "GET",
        "/1.0/instances/t15-a/files?path=relative",
        None,
    )?;
    assert_eq!(code, 400);
    let (code, _) = curl(
        &c,
        key,
        "POST",
        "/1.0/instances/t15-a/exec",
        Some("{\"command\": [], \"wait-for-websocket\": true}"),
    )?;
    assert_eq!(code, 400);
    let (code, body) = curl(
        &c,
        key,
        "POST",
        "/1.0/instances/t15-a/exec",
        Some("{\"command\": [\"true\"], \"wait-for-websocket\": true}"),
    )?;
    assert_eq!(code, 400, "exec into a stopped instance: {body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not running")
    );
    assert_eq!(
        c.berth_ok(&["config", "get", "t15-a", "limits.memory"])?
            .trim(),
        "128MiB"
    );

    // Rename a stopped instance, then delete it.
    c.berth_ok(&["rename", "t15-a", "t15-b"])?;
    c.berth_ok(&["start", "t15-b"])?;
    let err = c.berth_err(&["delete", "t15-b"])?;
    assert!(err.contains("running"), "{err}");
    c.berth_ok(&["delete", "--force", "t15-b"])?;
    Ok(())
}

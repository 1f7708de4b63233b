//! Images through the API: an LXD-format image imported with the CLI (unified and split
//! tarballs) launches; aliases and deletion work.

use berth_tests::{Cluster, make_image};

#[test]
fn imported_images_launch() -> anyhow::Result<()> {
    let c = Cluster::start()?;
    let work = tempfile::tempdir()?;
    make_image(work.path())?;
    let p = |f: &str| work.path().join(f).display().to_string();

    let out = c.berth_ok(&[
        "image",
        "import",
        &p("unified.tar.xz"),
        "--alias",
        "t40/unified",
    ])?;
    assert!(out.contains("fingerprint"), "{out}");
    c.berth_ok(&[
        "image",
        "import",
        &p("meta.tar"),
        &p("rootfs.tar.gz"),
        "--alias",
        "t40-split",
    ])?;
    let list = c.berth_ok(&["image", "list", "--format", "json"])?;
    assert!(
        list.contains("t40/unified") && list.contains("t40-split"),
        "{list}"
    );
    let info = c.berth_ok(&["image", "info", "t40/unified"])?;
    assert!(info.contains("testos"), "{info}");

    for (image, name) in [("t40/unified", "t40-a"), ("t40-split", "t40-b")] {
        c.berth_ok(&["launch", image, name])?;
        let (code, out, err) = c.exec(name, &["cat", "/proc/1/comm"])?;
        assert_eq!((code, out.trim()), (0, "init"), "{image}: {err}");
        let (_, out, _) = c.exec(name, &["hostname"])?;
        assert_eq!(out.trim(), name);
        c.berth_ok(&["delete", "--force", name])?;
    }

    // A tarball that is not an image is refused, and nothing is added.
    let count = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .map(|v| v.as_array().map(Vec::len).unwrap_or(0))
            .unwrap_or(0)
    };
    let images_before = count(&c.berth_ok(&["image", "list", "--format", "json"])?);
    std::fs::write(work.path().join("junk.tar"), b"this is not a tarball")?;
    let err = c.berth_err(&["image", "import", &p("junk.tar")])?;
    assert!(err.contains("extract") || err.contains("not"), "{err}");
    let before = c.berth_ok(&["image", "list", "--format", "json"])?;
    assert_eq!(
        count(&before),
        images_before,
        "the refused import added an image"
    );

    // Aliases and deletion.
    let images: serde_json::Value = serde_json::from_str(&before)?;
    let fingerprint = images
        .as_array()
        .and_then(|a| {
            a.iter().find(|i| {
                i["aliases"]
                    .as_array()
                    .is_some_and(|al| al.iter().any(|x| x["name"] == "t40/unified"))
            })
        })
        .and_then(|i| i["fingerprint"].as_str())
        .unwrap_or_default()
        .to_string();
    assert_eq!(fingerprint.len(), 64, "{before}");
    c.berth_ok(&["image", "alias", "create", "t40-other", &fingerprint])?;
    let aliases = c.berth_ok(&["image", "alias", "list"])?;
    assert!(aliases.contains("t40-other"), "{aliases}");
    c.berth_ok(&["image", "alias", "delete", "t40-other"])?;
    c.berth_ok(&["image", "delete", "t40/unified"])?;
    let after = c.berth_ok(&["image", "list", "--format", "json"])?;
    assert_eq!(count(&after), count(&before) - 1, "{after}");
    let err = c.berth_err(&["launch", "t40/unified", "t40-c"])?;
    assert!(err.contains("not found"), "{err}");
    Ok(())
}

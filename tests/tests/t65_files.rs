//! Files on a real busybox instance: a recursive push and pull keep modes, owners and symlinks
//! both ways; `berth file edit` through `$EDITOR` (on a terminal) and from stdin keeps mode and
//! owner; `berth file delete` of files, empty directories and (`-f`) whole trees.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use berth_tests::{Cluster, bin_dir};

#[test]
fn files_keep_modes_owners_and_symlinks() -> Result<()> {
    let c = Cluster::start()?;
    let result = run(&c);
    if result.is_err() {
        eprintln!("---- agent log ----\n{}", c.agent_log());
    }
    result
}

/// `stat -c FORMAT PATH` inside the instance (busybox's stat does not follow symlinks).
fn stat_inside(c: &Cluster, name: &str, format: &str, path: &str) -> Result<String> {
    let (code, out, err) = c.exec(name, &["stat", "-c", format, path])?;
    ensure!(code == 0, "stat {path} inside failed ({code}): {err}");
    Ok(out.trim().to_string())
}

/// (mode bits, uid, gid) of a host path, not following a symlink.
fn stat_host(path: &Path) -> Result<(u32, u32, u32)> {
    let md = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
    Ok((md.mode() & 0o7777, md.uid(), md.gid()))
}

fn run(c: &Cluster) -> Result<()> {
    let name = "t65-f1";
    c.berth_ok(&["image", "build", "busybox"])?;
    c.berth_ok(&["launch", "busybox", name])?;

    // A local tree: a 0750 directory and a 0600 file owned by 1000:1000, and a symlink.
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("priv"))?;
    std::fs::write(tree.join("priv/secret"), "s3cret\n")?;
    std::fs::set_permissions(tree.join("priv/secret"), PermissionsExt::from_mode(0o600))?;
    std::os::unix::fs::chown(tree.join("priv/secret"), Some(1000), Some(1000))?;
    std::fs::set_permissions(tree.join("priv"), PermissionsExt::from_mode(0o750))?;
    std::os::unix::fs::chown(tree.join("priv"), Some(1000), Some(1000))?;
    std::os::unix::fs::symlink("priv/secret", tree.join("link"))?;
    std::os::unix::fs::lchown(tree.join("link"), Some(1000), Some(1001))?;

    c.berth_ok(&[
        "file",
        "push",
        "-r",
        &tree.display().to_string(),
        &format!("{name}/root/"),
    ])?;
    assert_eq!(
        stat_inside(c, name, "%a %u %g", "/root/tree/priv")?,
        "750 1000 1000"
    );
    assert_eq!(
        stat_inside(c, name, "%a %u %g", "/root/tree/priv/secret")?,
        "600 1000 1000"
    );
    assert_eq!(
        stat_inside(c, name, "%F %u %g", "/root/tree/link")?,
        "symbolic link 1000 1001"
    );
    let (_, out, _) = c.exec(name, &["readlink", "/root/tree/link"])?;
    assert_eq!(out.trim(), "priv/secret");
    let (_, out, _) = c.exec(name, &["cat", "/root/tree/link"])?;
    assert_eq!(out, "s3cret\n", "the symlink resolves inside");

    // Pulled back: the same modes, owners (we are root) and the symlink as a symlink.
    let back = tmp.path().join("back");
    c.berth_ok(&[
        "file",
        "pull",
        "-r",
        &format!("{name}/root/tree"),
        &back.display().to_string(),
    ])?;
    assert_eq!(stat_host(&back.join("priv"))?, (0o750, 1000, 1000));
    assert_eq!(stat_host(&back.join("priv/secret"))?, (0o600, 1000, 1000));
    assert_eq!(
        std::fs::read_to_string(back.join("priv/secret"))?,
        "s3cret\n"
    );
    let link = back.join("link");
    assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
    assert_eq!(std::fs::read_link(&link)?, Path::new("priv/secret"));
    let (_, uid, gid) = stat_host(&link)?;
    assert_eq!((uid, gid), (1000, 1001));

    // file edit with $EDITOR, on a terminal (script(1) gives it one).
    let out = Command::new("script")
        .args([
            "-qec",
            &format!(
                "{} file edit {name}/root/tree/priv/secret",
                bin_dir().join("berth").display()
            ),
            "/dev/null",
        ])
        .env("BERTH_CONF", c.dir.join("cli"))
        .env_remove("BERTH_REMOTE")
        .env_remove("VISUAL")
        .env("EDITOR", "sed -i s/s3cret/edited/")
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "file edit with EDITOR failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, text, _) = c.exec(name, &["cat", "/root/tree/priv/secret"])?;
    assert_eq!(text, "edited\n");
    assert_eq!(
        stat_inside(c, name, "%a %u %g", "/root/tree/priv/secret")?,
        "600 1000 1000"
    );

    // file edit from stdin.
    let mut child = Command::new(bin_dir().join("berth"))
        .args(["file", "edit", &format!("{name}/root/tree/priv/secret")])
        .env("BERTH_CONF", c.dir.join("cli"))
        .env_remove("BERTH_REMOTE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(b"from stdin\n")?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "file edit from stdin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, text, _) = c.exec(name, &["cat", "/root/tree/priv/secret"])?;
    assert_eq!(text, "from stdin\n");
    assert_eq!(
        stat_inside(c, name, "%a %u %g", "/root/tree/priv/secret")?,
        "600 1000 1000"
    );
    let err = c.berth_err(&["file", "edit", &format!("{name}/root/tree/priv")])?;
    assert!(err.contains("only files can be edited"), "{err}");

    // file delete: a symlink (not what it points to), an empty directory, a full one with -f.
    c.berth_ok(&["file", "delete", &format!("{name}/root/tree/link")])?;
    let (code, _, _) = c.exec(name, &["test", "-L", "/root/tree/link"])?;
    assert_ne!(code, 0, "the symlink is gone");
    let (code, _, _) = c.exec(name, &["test", "-f", "/root/tree/priv/secret"])?;
    assert_eq!(code, 0, "its target is still there");
    c.exec(name, &["mkdir", "/root/empty"])?;
    c.berth_ok(&["file", "delete", &format!("{name}/root/empty")])?;
    let (code, _, _) = c.exec(name, &["test", "-e", "/root/empty"])?;
    assert_ne!(code, 0, "the empty directory is gone");
    let err = c.berth_err(&["file", "delete", &format!("{name}/root/tree")])?;
    assert!(
        err.contains("directory not empty") && err.contains("use -f"),
        "a full directory is refused without -f: {err}"
    );
    let (code, _, _) = c.exec(name, &["test", "-f", "/root/tree/priv/secret"])?;
    assert_eq!(code, 0, "nothing was deleted without -f");
    c.berth_ok(&["file", "delete", "-f", &format!("{name}/root/tree")])?;
    let (code, _, _) = c.exec(name, &["test", "-e", "/root/tree"])?;
    assert_ne!(code, 0, "the tree is gone");
    let err = c.berth_err(&["file", "delete", &format!("{name}/root/tree")])?;
    assert!(
        err.contains("not found") || err.contains("no such"),
        "{err}"
    );
    Ok(())
}

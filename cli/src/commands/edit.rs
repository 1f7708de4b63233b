//! Editing an object as YAML: in `$VISUAL`/`$EDITOR` on a terminal, or read from stdin when
//! it is piped (`berth project show p | sed ... | berth project edit p`).

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::ClientError;

/// Parses YAML into `T`; the error names the line and column.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("cannot parse the YAML: {e}"))
}

/// The one sentence an edit with no content gets (nothing is sent to the server).
pub const EMPTY_EDIT: &str = "the edited text is empty; nothing was changed";

/// Whether the edited text holds nothing: only whitespace, comments or an empty document
/// (which would otherwise parse as an object with every field at its default and wipe it).
pub fn is_empty_edit(text: &str) -> bool {
    let blank = text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    });
    blank
        || matches!(
            serde_yaml::from_str::<serde_yaml::Value>(text),
            Ok(serde_yaml::Value::Null)
        )
}

/// Parses YAML into `T`, ignoring the top-level keys `read_only` (the fields `show` prints but
/// an edit cannot change, such as `name` or `used_by`), so that `show | edit` works.
pub fn parse_yaml_ignoring<T: DeserializeOwned>(
    text: &str,
    read_only: &[&str],
) -> anyhow::Result<T> {
    let first = match parse_yaml(text) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let Ok(serde_yaml::Value::Mapping(mut map)) = serde_yaml::from_str(text) else {
        return Err(first);
    };
    let before = map.len();
    for k in read_only {
        map.remove(*k);
    }
    if map.len() == before {
        return Err(first);
    }
    serde_yaml::from_value(serde_yaml::Value::Mapping(map))
        .map_err(|e| anyhow::anyhow!("cannot parse the YAML: {e}"))
}

/// The edited form of `current`: read from stdin when it is not a terminal, else from the
/// editor (opened again until the text parses, or the user gives up).
pub fn edit<T: Serialize + DeserializeOwned>(current: &T) -> anyhow::Result<T> {
    edit_ignoring(current, &[])
}

/// [`edit`], where the text may also hold the `read_only` keys (ignored).
pub fn edit_ignoring<T: Serialize + DeserializeOwned>(
    current: &T,
    read_only: &[&str],
) -> anyhow::Result<T> {
    if std::io::stdin().is_terminal() {
        edit_in_editor(&serde_yaml::to_string(current)?, read_only)
    } else {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        if is_empty_edit(&text) {
            anyhow::bail!(EMPTY_EDIT);
        }
        parse_yaml_ignoring(&text, read_only)
    }
}

/// Turns the server's 412 (the object changed since it was read) into a sentence that says
/// what to do.
pub fn stale(what: &str, e: ClientError) -> anyhow::Error {
    if e.status() == Some(412) {
        anyhow::anyhow!(
            "{what} was changed by someone else since it was read; nothing was saved, edit it again"
        )
    } else {
        e.into()
    }
}

/// Opens `$VISUAL`/`$EDITOR` (default vi) on `text` until it parses or the user gives up.
fn edit_in_editor<T: DeserializeOwned>(text: &str, read_only: &[&str]) -> anyhow::Result<T> {
    let path = std::env::temp_dir().join(format!("berth_edit_{}.yaml", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let result = (|| {
        f.write_all(text.as_bytes())?;
        drop(f);
        let editor = std::env::var("VISUAL")
            .or_else(|_| std::env::var("EDITOR"))
            .unwrap_or_else(|_| "vi".into());
        loop {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{editor} \"$1\""))
                .arg("sh")
                .arg(&path)
                .status()
                .map_err(|e| anyhow::anyhow!("cannot run the editor {editor}: {e}"))?;
            if !status.success() {
                anyhow::bail!("the editor {editor} failed ({status})");
            }
            let edited = std::fs::read_to_string(&path)?;
            if is_empty_edit(&edited) {
                anyhow::bail!(EMPTY_EDIT);
            }
            match parse_yaml_ignoring(&edited, read_only) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let mut err = std::io::stderr();
                    let _ = writeln!(err, "Config parsing error: {e}");
                    let _ = writeln!(
                        err,
                        "Press enter to open the editor again or ctrl+c to abort change"
                    );
                    let mut line = String::new();
                    if std::io::stdin().read_line(&mut line)? == 0 {
                        anyhow::bail!("nothing changed");
                    }
                }
            }
        }
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::api::tenancy::ProjectPut;

    #[test]
    fn yaml_errors_name_the_place() {
        let e = parse_yaml::<ProjectPut>("config:\n  a: b\nbogus: 1\n").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let ok: ProjectPut = parse_yaml("description: x\n").unwrap();
        assert_eq!(ok.description, "x");
    }

    #[test]
    fn shown_objects_can_be_edited_back() {
        let shown = "name: a\ndescription: d\nconfig:\n  limits.cpu: '2'\nused_by: []\n";
        let put: ProjectPut = parse_yaml_ignoring(shown, &["name", "used_by"]).unwrap();
        assert_eq!(put.description, "d");
        assert_eq!(put.config["limits.cpu"], "2");
        let e = parse_yaml_ignoring::<ProjectPut>("name: a\nbogus: 1\n", &["name"]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e =
            parse_yaml_ignoring::<ProjectPut>("description: x\nbogus: 1\n", &["name"]).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn empty_edits_are_recognised() {
        for text in ["", "  \n\t\n", "# all gone\n  # really\n", "---\n", "~\n"] {
            assert!(is_empty_edit(text), "{text:?}");
        }
        for text in ["description: ''\n", "{}\n", "config: {}\n", "bogus: [\n"] {
            assert!(!is_empty_edit(text), "{text:?}");
        }
    }

    #[test]
    fn stale_edits() {
        let e = stale(
            "project \"a\"",
            ClientError::Api {
                status: 412,
                message: "etag mismatch".into(),
            },
        );
        assert!(e.to_string().starts_with("project \"a\" was changed"));
        let e = stale(
            "x",
            ClientError::Api {
                status: 404,
                message: "not found".into(),
            },
        );
        assert_eq!(e.to_string(), "not found");
    }
}

//! Every runbook in `runbooks/` validates, and every broken runbook in
//! `tests/broken/` gives exactly the diagnostics in its `.expected` file.

use std::path::Path;

fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()).unwrap_or_default())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_runbook_validates_and_plans() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runbooks");
    let files = yaml_files(&dir);
    assert!(!files.is_empty(), "no runbooks in {}", dir.display());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rb = ferry_engine::parse(&name, &text).unwrap_or_else(|d| panic!("{name}:\n{d}"));
        // What an operator must pass (a failback's sockets and disks), as a value.
        let given = rb
            .params
            .iter()
            .filter(|p| p.default.is_none())
            .map(|p| (p.name.clone(), "/srv/example".to_owned()))
            .collect();
        let plan = ferry_engine::plan(rb, &given).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!plan.waves.is_empty(), "{name}");
    }
}

#[test]
fn broken_runbooks_give_the_expected_diagnostics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let files = yaml_files(&dir);
    assert!(files.len() >= 6);
    let mut failures = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let expected = std::fs::read_to_string(f.with_extension("expected")).unwrap_or_default();
        let got = match ferry_engine::parse(&name, &text) {
            Ok(_) => "(no diagnostics)\n".to_owned(),
            Err(d) => d.0.iter().map(|x| format!("{x}\n")).collect(),
        };
        if got != expected {
            failures.push(format!("== {name}\n-- expected\n{expected}-- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The generated schemas in `docs/` are what this build generates: the
/// runbook schema (for editors) and the event log's (a declared format).
/// Refresh with `ferry schema > docs/runbook.schema.json` and
/// `ferry schema --events > docs/event-log.schema.json`.
#[test]
fn generated_schemas_in_docs_are_fresh() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    for (file, schema) in [
        ("runbook.schema.json", ferry_engine::schema::schema()),
        (
            "event-log.schema.json",
            ferry_engine::schema::event_schema(),
        ),
    ] {
        let text =
            std::fs::read_to_string(docs.join(file)).unwrap_or_else(|e| panic!("docs/{file}: {e}"));
        let committed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            committed, schema,
            "docs/{file} is stale: regenerate it with `ferry schema`"
        );
    }
}

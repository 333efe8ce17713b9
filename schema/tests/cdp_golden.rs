//! caddy-docker-proxy's own golden files, run against our translation:
//! every file in `testdata/cdp/labels` and `testdata/cdp/merge` is a test,
//! and so is every file of ours in the same format in `testdata/fleet/labels`
//! (template functions caddy-docker-proxy labels use).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use caddy_fleet_schema::caddyfile::Caddyfile;
use caddy_fleet_schema::labels::{from_labels, parse_golden_labels};
use caddy_fleet_schema::template::FixedTargets;

const SEPARATOR: &str = "----------";

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    files
}

#[test]
fn every_labels_golden_file_translates_exactly() {
    let mut failures = Vec::new();
    let mut count = 0;
    for path in files("cdp/labels").into_iter().chain(files("fleet/labels")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let (_, expected) = text.split_once(SEPARATOR).expect("separator");
        let expected = expected.trim();
        let labels: BTreeMap<String, String> = parse_golden_labels(&text);
        let result = from_labels(&labels, "caddy", &FixedTargets(vec!["target".into()]));
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        count += 1;
        match (result, expected.is_empty()) {
            (Ok(file), false) => {
                let got = file.marshal();
                if got.trim() != expected {
                    failures.push(format!(
                        "{name}:\n--- expected\n{expected}\n--- got\n{}",
                        got.trim()
                    ));
                }
            }
            (Err(_), true) => {}
            (Ok(file), true) => failures.push(format!(
                "{name}: expected an error, got\n{}",
                file.marshal()
            )),
            (Err(e), false) => failures.push(format!("{name}: unexpected error {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} files differ:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_merge_golden_file_merges_exactly() {
    let mut failures = Vec::new();
    for path in files("cdp/merge") {
        let text = std::fs::read_to_string(&path).unwrap();
        let parts: Vec<&str> = text.split(&format!("{SEPARATOR}\n")).collect();
        assert_eq!(parts.len(), 3, "{}", path.display());
        let mut first = Caddyfile::parse(parts[0]).unwrap();
        first.merge(Caddyfile::parse(parts[1]).unwrap());
        let got = first.marshal();
        if got != parts[2] {
            failures.push(format!(
                "{}:\n--- expected\n{}--- got\n{got}",
                path.display(),
                parts[2]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

//! The dependency rules of ARCHITECTURE.md, checked without Docker: the
//! workspace's crates and the root crate's modules form no cycle, and the
//! debugging component (`caddy-fleet-inspect`) depends on neither the
//! binary's crate, its modes nor the publisher.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// A cycle in `graph`, if there is one, as the path that closes it.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// Everything `node` reaches in `graph`.
fn reachable(graph: &Graph, node: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![node.to_string()];
    while let Some(n) = todo.pop() {
        for next in graph.get(&n).into_iter().flatten() {
            if seen.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    seen
}

/// The workspace's crates and their normal and build dependencies on
/// each other, from `cargo metadata`.
fn crate_graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().unwrap().to_string())
                .filter(|d| names.contains(d))
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

/// The Rust files of `dir`, by file stem, without comments.
fn sources(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let code: Vec<&str> = text
                .lines()
                .map(|line| line.split("//").next().unwrap_or(""))
                .collect();
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            (stem, code.join("\n"))
        })
        .collect()
}

/// The identifiers following each `prefix` in `code` (`crate::x` → `x`).
fn paths_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    code.match_indices(prefix).filter_map(move |(at, _)| {
        let rest = &code[at + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        // `xcrate::` is not `crate::`.
        let before = code[..at].chars().last();
        (!before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') && end > 0)
            .then(|| &rest[..end])
    })
}

/// The root crate's modules (`src/*.rs`; `lib` is the crate root) and
/// which use which through `crate::` paths.
fn module_graph() -> Graph {
    let files = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let modules: BTreeSet<&str> = files
        .keys()
        .map(String::as_str)
        .filter(|m| *m != "main")
        .collect();
    files
        .iter()
        .filter(|(module, _)| modules.contains(module.as_str()))
        .map(|(module, code)| {
            let uses = paths_after(code, "crate::")
                .map(|first| match modules.contains(first) {
                    true => first.to_string(),
                    // An item of the crate root.
                    false => "lib".to_string(),
                })
                .filter(|used| used != module)
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

#[test]
fn the_workspace_crates_form_no_cycle_and_inspect_stands_apart() {
    let graph = crate_graph();
    for member in [
        "caddy-fleet",
        "caddy-fleet-schema",
        "caddy-fleet-nats",
        "caddy-fleet-publisher",
        "caddy-fleet-applier",
        "caddy-fleet-inspect",
    ] {
        assert!(graph.contains_key(member), "{member} in {graph:?}");
    }
    assert_eq!(find_cycle(&graph), None, "{graph:?}");
    let inspect = reachable(&graph, "caddy-fleet-inspect");
    assert_eq!(
        inspect,
        BTreeSet::from([
            "caddy-fleet-schema".to_string(),
            "caddy-fleet-nats".to_string(),
            "caddy-fleet-applier".to_string(),
        ]),
        "the debugging component uses the core, the log and the applier's store only"
    );
    assert!(
        reachable(&graph, "caddy-fleet-schema").is_empty(),
        "schema depends on no other crate of the workspace"
    );
    assert!(!reachable(&graph, "caddy-fleet-applier").contains("caddy-fleet-inspect"));
}

#[test]
fn the_debugging_components_code_names_no_crate_it_must_not_use() {
    let files = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("inspect/src"));
    assert!(files.contains_key("lib"));
    for (file, code) in &files {
        let crates: BTreeSet<&str> = paths_after(code, "caddy_fleet_")
            .chain(paths_after(code, "caddy_fleet::").map(|_| "(root)"))
            .collect();
        for used in &crates {
            assert!(
                ["schema", "nats", "applier"].contains(used),
                "inspect/src/{file}.rs uses caddy_fleet_{used}"
            );
        }
    }
}

#[test]
fn the_root_crates_modules_form_no_cycle_and_modes_know_nothing_of_inspect() {
    let graph = module_graph();
    assert!(graph.contains_key("modes") && graph.contains_key("settings"));
    assert_eq!(find_cycle(&graph), None, "{graph:?}");
    let files = sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    for (module, code) in &files {
        let names_inspect = code.contains("inspect::") || code.contains("caddy_fleet_inspect");
        // `dashboard` is glue too: it hands the debugging component's
        // reads to the applier's page (`LogReads`), so the applier never
        // depends on it.
        assert!(
            !names_inspect || ["lib", "main", "settings", "dashboard"].contains(&module.as_str()),
            "src/{module}.rs uses the debugging component; only the binary's glue may"
        );
    }
}

#[test]
fn cycles_are_found() {
    let graph: Graph = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
    let code = "use crate::modes::X; let y = crate::FleetError; notcrate::z";
    assert_eq!(
        paths_after(code, "crate::").collect::<Vec<_>>(),
        ["modes", "FleetError"]
    );
}

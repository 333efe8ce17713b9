//! caddy-docker-proxy's label grammar: container labels → a Caddyfile.
//!
//! - Only labels named `<prefix>`, `<prefix>_N`, or either followed by
//!   `.path`, are read; look-alikes (`caddy_version`) are ignored.
//! - Each root (`caddy`, `caddy_0`, `caddy_1`, …) is its own top-level
//!   block; its value is the site address list. A root without a value is
//!   the global options block.
//! - Dots nest (`caddy.reverse_proxy.health_uri`); `\.` is a literal dot.
//! - `N_name` orders siblings by `N`; `name_N` makes an isolated block
//!   printed as `name`. Equal paths share one block.
//! - Values are templates (`{{upstreams 80}}`), then split into tokens by
//!   the Caddyfile lexer.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::caddyfile::{is_representable, Block, Caddyfile, UNORDERED};
use crate::lexer::tokenize;
use crate::limits::{check_labels, shortened, LimitError, MAX_LABEL_VALUE_BYTES};
use crate::template::{render, Upstreams};

/// A label that could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label}: {reason}")]
pub struct LabelError {
    /// The label's key.
    pub label: String,
    /// What was wrong with it.
    pub reason: String,
}

/// Whether `key` is a label caddy-docker-proxy reads for `prefix`: the
/// prefix itself, `prefix_N`, or either followed by `.` and a path.
pub fn is_caddy_label(key: &str, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    let rest = match rest.strip_prefix('_') {
        Some(numbered) => {
            let digits = numbered.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return false;
            }
            &numbered[digits..]
        }
        None => rest,
    };
    rest.is_empty() || rest.starts_with('.')
}

/// One path segment: `[N_]name[_M]`.
struct Segment {
    order: i64,
    name: String,
}

/// Splits a path at its last unescaped dot: `(parent, segment)`.
fn split_path(path: &str) -> Option<(Option<&str>, Segment)> {
    // The last dot not preceded by a backslash.
    let bytes = path.as_bytes();
    let mut split = None;
    for i in (0..bytes.len()).rev() {
        if bytes[i] == b'.' && (i == 0 || bytes[i - 1] != b'\\') {
            split = Some(i);
            break;
        }
    }
    let (parent, last) = match split {
        Some(i) => (Some(&path[..i]), &path[i + 1..]),
        None => (None, path),
    };
    if last.is_empty() || parent == Some("") {
        return None;
    }
    let digits = last.bytes().take_while(u8::is_ascii_digit).count();
    let (order, rest) = match last[digits..].strip_prefix('_') {
        Some(rest) if digits > 0 && !rest.is_empty() => {
            (last[..digits].parse().unwrap_or(UNORDERED), rest)
        }
        _ => (UNORDERED, last),
    };
    let name = match rest.rsplit_once('_') {
        Some((name, n))
            if !name.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => rest,
    };
    Some((
        parent,
        Segment {
            order,
            name: name.replace("\\.", "."),
        },
    ))
}

/// Blocks under construction, in an arena so that paths can refer to
/// them by index while children are added.
#[derive(Default)]
struct Tree {
    nodes: Vec<Node>,
    roots: Vec<usize>,
    /// The node of each full label path seen so far.
    paths: HashMap<String, usize>,
}

struct Node {
    keys: Vec<String>,
    order: i64,
    children: Vec<usize>,
}

impl Tree {
    fn get_or_create(&mut self, path: &str) -> Result<usize, String> {
        if let Some(&node) = self.paths.get(path) {
            return Ok(node);
        }
        let (parent, segment) = split_path(path).ok_or_else(|| "empty path segment".to_string())?;
        let node = match parent {
            Some(parent) => {
                let parent = self.get_or_create(parent)?;
                let node = self.nodes.len();
                self.nodes.push(Node {
                    keys: vec![segment.name],
                    order: segment.order,
                    children: Vec::new(),
                });
                self.nodes[parent].children.push(node);
                node
            }
            None => {
                let node = self.nodes.len();
                self.nodes.push(Node {
                    keys: Vec::new(),
                    order: segment.order,
                    children: Vec::new(),
                });
                self.roots.push(node);
                node
            }
        };
        self.paths.insert(path.to_string(), node);
        Ok(node)
    }

    fn block(&self, node: usize) -> Block {
        let n = &self.nodes[node];
        Block {
            keys: n.keys.clone(),
            children: n.children.iter().map(|&c| self.block(c)).collect(),
            order: n.order,
        }
    }
}

/// The container ports the labels' `{{upstreams}}` actions ask for (`None`
/// for `{{upstreams}}` without a port), in whatever labels render; labels
/// that fail to translate name what they named before the failure. A
/// publisher probes these before it reports a started container.
pub fn upstream_ports(labels: &BTreeMap<String, String>, prefix: &str) -> BTreeSet<Option<u16>> {
    /// Answers every `{{upstreams}}` with a placeholder and keeps the port.
    struct Recorder(std::cell::RefCell<BTreeSet<Option<u16>>>);
    impl Upstreams for Recorder {
        fn resolve(&self, port: Option<u16>) -> Result<Vec<String>, String> {
            self.0.borrow_mut().insert(port);
            Ok(vec!["127.0.0.1".to_string()])
        }
    }
    let recorder = Recorder(std::cell::RefCell::new(BTreeSet::new()));
    // Only the ports are wanted: a label error is the applier's to report.
    let _ = from_labels(labels, prefix, &recorder);
    recorder.0.into_inner()
}

/// Translates the labels under `prefix` into a Caddyfile (unsorted; it is
/// sorted when marshalled). Any bad label fails the whole container, as in
/// caddy-docker-proxy.
pub fn from_labels(
    labels: &BTreeMap<String, String>,
    prefix: &str,
    upstreams: &dyn Upstreams,
) -> Result<Caddyfile, LabelError> {
    // Bounds first: what follows recurses once per key segment and holds
    // every rendered value, so nothing unbounded may reach it.
    check_labels(labels, prefix).map_err(|error| LabelError {
        label: limit_label(&error),
        reason: error.to_string(),
    })?;
    let mut tree = Tree::default();
    for (label, value) in labels.iter().filter(|(k, _)| is_caddy_label(k, prefix)) {
        let error = |reason: String| LabelError {
            label: label.clone(),
            reason,
        };
        let node = tree.get_or_create(label).map_err(error)?;
        let text = render(value, upstreams).map_err(error)?;
        if text.len() > MAX_LABEL_VALUE_BYTES {
            return Err(error(format!(
                "the value renders to {} bytes (at most {MAX_LABEL_VALUE_BYTES})",
                text.len()
            )));
        }
        tree.nodes[node]
            .keys
            .extend(tokenize(&text).into_iter().map(|t| t.text));
    }
    // Every token must survive marshalling as itself (see `quote_token`).
    if let Some(token) = tree
        .nodes
        .iter()
        .flat_map(|n| &n.keys)
        .find(|k| !is_representable(k))
    {
        return Err(LabelError {
            label: "*".to_string(),
            reason: format!(
                "token {:?} holds a backtick and a backslash before a quote, a newline or its end; no Caddyfile quoting can carry it",
                shortened(token, 64)
            ),
        });
    }
    Ok(Caddyfile {
        blocks: tree.roots.iter().map(|&r| tree.block(r)).collect(),
    })
}

/// The label a bound was exceeded by, as far as it can be named.
fn limit_label(error: &LimitError) -> String {
    match error {
        LimitError::KeyTooLong { key, .. }
        | LimitError::TooManySegments { key, .. }
        | LimitError::ValueTooLong { key, .. } => shortened(key, 64).to_string(),
        LimitError::TooManyLabels { .. } | LimitError::MessageTooLarge { .. } => "*".to_string(),
    }
}

/// Reads labels in caddy-docker-proxy's golden-file format: one
/// `KEY = VALUE` per line (split at the first `=`, both sides trimmed),
/// blank lines and `#` comments skipped, `NEW_LINE` in a value standing for
/// a newline, a repeated key overwriting; everything after a line of ten
/// dashes is ignored.
pub fn parse_golden_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("----------") {
            break;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            labels.insert(
                key.trim().to_string(),
                value.trim().replace("NEW_LINE", "\n"),
            );
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::FixedTargets;

    #[test]
    fn upstream_ports_are_what_the_templates_ask_for() {
        let labels: BTreeMap<String, String> = [
            ("caddy", "a.test"),
            ("caddy.reverse_proxy", "{{upstreams 8080}}"),
            ("caddy_1", "b.test"),
            ("caddy_1.reverse_proxy", "/api* {{upstreams}}"),
            ("other.reverse_proxy", "{{upstreams 9}}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            upstream_ports(&labels, "caddy"),
            BTreeSet::from([None, Some(8080)])
        );
        let literal: BTreeMap<String, String> = [
            ("caddy".to_string(), "c.test".to_string()),
            ("caddy.respond".to_string(), "ok".to_string()),
        ]
        .into();
        assert!(upstream_ports(&literal, "caddy").is_empty());
    }

    #[test]
    fn prefix_rule_matches_cdp() {
        for yes in ["caddy", "caddy.reverse_proxy", "caddy_0", "caddy_12.tls"] {
            assert!(is_caddy_label(yes, "caddy"), "{yes}");
        }
        for no in [
            "caddy_version",
            "caddy_.x",
            "caddy_ingress_network",
            "caddyx",
            "xcaddy",
            "caddy_1x",
        ] {
            assert!(!is_caddy_label(no, "caddy"), "{no}");
        }
    }

    #[test]
    fn segments_parse_like_cdp() {
        let seg = |p: &str| {
            split_path(p).map(|(parent, s)| (parent.map(str::to_string), s.order, s.name))
        };
        assert_eq!(
            seg("caddy.1_tls"),
            Some((Some("caddy".into()), 1, "tls".into()))
        );
        assert_eq!(
            seg("caddy.groupa_2"),
            Some((Some("caddy".into()), UNORDERED, "groupa".into()))
        );
        assert_eq!(
            seg("caddy.reverse_proxy"),
            Some((Some("caddy".into()), UNORDERED, "reverse_proxy".into()))
        );
        assert_eq!(seg("caddy_1"), Some((None, UNORDERED, "caddy".into())));
        assert_eq!(
            seg("caddy.a.mydomain\\.fr"),
            Some((Some("caddy.a".into()), UNORDERED, "mydomain.fr".into()))
        );
        assert_eq!(
            seg("caddy.1_@foo"),
            Some((Some("caddy".into()), 1, "@foo".into()))
        );
        assert!(seg("caddy.").is_none());
    }

    #[test]
    fn a_key_of_any_depth_is_a_clear_error() {
        for depth in [17, 1_000, 1_000_000] {
            let key = format!("caddy{}", ".a".repeat(depth));
            let labels: BTreeMap<String, String> = [
                ("caddy".to_string(), "a.test".to_string()),
                (key, "x".to_string()),
            ]
            .into();
            let err = from_labels(&labels, "caddy", &FixedTargets::default()).unwrap_err();
            assert!(err.to_string().len() < 300, "{depth}: {err}");
        }
        // Within the bounds, the deepest key still translates.
        let key = format!("caddy{}", ".a".repeat(15));
        let labels: BTreeMap<String, String> = [
            ("caddy".to_string(), "a.test".to_string()),
            (key, "x".to_string()),
        ]
        .into();
        assert!(from_labels(&labels, "caddy", &FixedTargets::default()).is_ok());
    }

    #[test]
    fn values_cannot_break_out_of_their_line() {
        let labels: BTreeMap<String, String> = [
            ("caddy", "a.test"),
            ("caddy.respond", "\"x\" } evil.test { respond pwned"),
            ("caddy.header.}", "`a`"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let text = from_labels(&labels, "caddy", &FixedTargets::default())
            .unwrap()
            .marshal();
        let parsed = Caddyfile::parse(&text).unwrap();
        assert_eq!(parsed.blocks.len(), 1, "{text}");
        assert_eq!(parsed.blocks[0].keys, ["a.test"], "{text}");

        let unquotable: BTreeMap<String, String> =
            [("caddy", "a.test"), ("caddy.respond", "a`\\\"")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let err = from_labels(&unquotable, "caddy", &FixedTargets::default()).unwrap_err();
        assert!(err.reason.contains("no Caddyfile quoting"), "{err}");
    }

    #[test]
    fn other_prefixes_and_lookalikes_are_ignored() {
        let labels: BTreeMap<String, String> = [
            ("edge", "a.test"),
            ("edge.respond", "ok"),
            ("caddy", "b.test"),
            ("edge_version", "2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let file = from_labels(&labels, "edge", &FixedTargets::default()).unwrap();
        assert_eq!(file.marshal(), "a.test {\n\trespond ok\n}\n");
    }
}

#[cfg(test)]
mod bounded {
    use proptest::prelude::*;

    use super::*;
    use crate::template::FixedTargets;

    fn depth() -> impl Strategy<Value = usize> {
        prop_oneof![Just(1_000_000usize), Just(16), Just(17), 0usize..5_000]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Translation of a label key of any depth (up to 1,000,000
        /// segments) returns a result or a clear error: it never recurses
        /// once per segment.
        #[test]
        fn any_depth_returns(depth in depth(), segment in "[a-z0-9_@\\\\.]{0,3}", value in ".{0,20}") {
            let mut key = String::from("caddy");
            for _ in 0..depth {
                key.push('.');
                key.push_str(&segment);
            }
            let segments = crate::limits::segments(&key);
            let labels: BTreeMap<String, String> =
                [("caddy".to_string(), "a.test".to_string()), (key, value)].into();
            match from_labels(&labels, "caddy", &FixedTargets::default()) {
                Ok(_) => prop_assert!(segments <= crate::limits::MAX_LABEL_SEGMENTS),
                Err(error) => prop_assert!(error.to_string().len() < 400),
            }
        }
    }
}

//! TLS automation policies across sites, as Caddy's adapter finishes them
//! (`consolidateAutomationPolicies` in `httpcaddyfile/tlsapp.go`): sorted
//! from most to least specific, empty policies for internal names dropped,
//! nothing at all when every policy is empty, and policies with the same
//! settings combined.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::gosort::slice_stable;

/// One automation policy: its subjects and the rest of its JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub subjects: Vec<String>,
    pub settings: Map<String, Value>,
}

impl Policy {
    /// Reads a policy's JSON object.
    pub fn from_json(value: &Value) -> Option<Policy> {
        let mut settings = value.as_object()?.clone();
        let subjects = match settings.remove("subjects") {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|s| s.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()?,
            Some(_) => return None,
            None => Vec::new(),
        };
        Some(Policy { subjects, settings })
    }

    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        if !self.subjects.is_empty() {
            object.insert(
                "subjects".into(),
                Value::Array(self.subjects.iter().cloned().map(Value::String).collect()),
            );
        }
        object.extend(self.settings.clone());
        Value::Object(object)
    }

    fn on_demand(&self) -> bool {
        self.settings.get("on_demand") == Some(&Value::Bool(true))
    }

    /// The fields Caddy compares to decide two policies are "the same".
    fn same_settings(&self, other: &Policy) -> bool {
        const FIELDS: [&str; 8] = [
            "issuers",
            "get_certificate",
            "storage",
            "must_staple",
            "key_type",
            "on_demand",
            "reuse_private_keys",
            "renewal_window_ratio",
        ];
        FIELDS
            .iter()
            .all(|f| self.settings.get(*f) == other.settings.get(*f))
    }

    /// Whether every name may get a public certificate (and none is a
    /// Tailscale name).
    pub fn has_all_public_names(&self) -> bool {
        !self
            .subjects
            .iter()
            .any(|s| !qualifies_for_public_cert(self.on_demand(), s) || is_tailscale(s))
    }
}

fn qualifies_for_public_cert(on_demand: bool, subject: &str) -> bool {
    !subject_is_ip(subject)
        && !subject_is_internal(subject)
        && (subject.matches("*.").count() < 2 || on_demand)
}

fn subject_is_ip(subject: &str) -> bool {
    subject.parse::<IpAddr>().is_ok()
}

/// certmagic's `SubjectIsInternal`.
fn subject_is_internal(subject: &str) -> bool {
    let host = host_only(subject);
    let s = host.trim_end_matches('.').to_lowercase();
    s == "localhost"
        || s.ends_with(".localhost")
        || s.ends_with(".local")
        || s.ends_with(".internal")
        || s.ends_with(".home.arpa")
        || is_internal_ip(&s)
}

fn host_only(hostport: &str) -> &str {
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => hostport,
    }
}

fn is_internal_ip(s: &str) -> bool {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_link_local(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => false,
    }
}

fn is_tailscale(name: &str) -> bool {
    name.to_lowercase().ends_with(".ts.net")
}

/// certmagic's `MatchWildcard`.
fn match_wildcard(subject: &str, wildcard: &str) -> bool {
    let subject = subject.to_lowercase();
    let wildcard = wildcard.to_lowercase();
    if subject == wildcard {
        return true;
    }
    if !wildcard.contains('*') {
        return false;
    }
    let mut labels: Vec<&str> = subject.split('.').collect();
    for i in 0..labels.len() {
        if labels[i].is_empty() {
            continue;
        }
        labels[i] = "*";
        if labels.join(".") == wildcard {
            return true;
        }
    }
    false
}

fn is_subset(a: &Policy, b: &Policy) -> bool {
    if b.subjects.is_empty() {
        return true;
    }
    if a.subjects.is_empty() {
        return false;
    }
    a.subjects
        .iter()
        .all(|x| b.subjects.iter().any(|y| match_wildcard(x, y)))
}

fn shadows(i: usize, aps: &[Policy]) -> Option<usize> {
    (i + 1..aps.len()).find(|&j| is_subset(&aps[i], &aps[j]))
}

/// Caddy's `consolidateAutomationPolicies`, on policies in the order the
/// adapter appended them. `None` when Caddy would leave no policy list.
pub fn consolidate(mut aps: Vec<Policy>) -> Option<Vec<Policy>> {
    slice_stable(&mut aps, &mut |a, b| {
        if is_subset(a, b) {
            return true;
        }
        if is_subset(b, a) {
            return false;
        }
        a.subjects.len() > b.subjects.len()
    });
    let original = aps.len();
    let mut empty = 0;
    let mut i = 0;
    while i < aps.len() {
        if aps[i].settings.is_empty() {
            empty += 1;
            if !aps[i].has_all_public_names() {
                aps.remove(i);
                continue;
            }
        }
        i += 1;
    }
    if empty == original {
        return None;
    }
    // Subjects already in aps[i], kept beside it for quick lookups.
    let mut seen: HashSet<String> = HashSet::new();
    let mut seen_for = usize::MAX;
    let mut i = 0;
    'outer: while i < aps.len() {
        let mut j = i + 1;
        while j < aps.len() {
            if aps[i] == aps[j] {
                aps.remove(j);
                continue 'outer;
            }
            if aps[i].same_settings(&aps[j]) {
                if !aps[i].subjects.is_empty() && aps[j].subjects.is_empty() {
                    if shadows(i, &aps).is_some_and(|s| s >= j) {
                        aps.remove(i);
                        seen_for = usize::MAX;
                        continue 'outer;
                    }
                } else {
                    if seen_for != i {
                        seen = aps[i].subjects.iter().cloned().collect();
                        seen_for = i;
                    }
                    let moved = std::mem::take(&mut aps[j].subjects);
                    for subject in moved {
                        if seen.insert(subject.clone()) {
                            aps[i].subjects.push(subject);
                        }
                    }
                    aps.remove(j);
                    continue;
                }
            }
            j += 1;
        }
        i += 1;
        seen_for = usize::MAX;
    }
    Some(aps)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn p(v: Value) -> Policy {
        Policy::from_json(&v).unwrap()
    }

    #[test]
    fn all_empty_policies_leave_none() {
        assert_eq!(
            consolidate(vec![
                p(json!({"subjects": ["a.test"]})),
                p(json!({"subjects": ["b.test"]}))
            ]),
            None
        );
    }

    #[test]
    fn same_settings_combine_and_internal_empties_go() {
        let internal = json!([{"module": "internal"}]);
        let got = consolidate(vec![
            p(json!({"subjects": ["a.test"]})),
            p(json!({"subjects": ["x.localhost"]})),
            p(json!({"subjects": ["b.test"], "issuers": internal})),
            p(json!({"subjects": ["c.test"]})),
        ])
        .unwrap();
        let got: Vec<Value> = got.iter().map(Policy::to_json).collect();
        assert_eq!(
            got,
            vec![
                json!({"subjects": ["a.test", "c.test"]}),
                json!({"subjects": ["b.test"], "issuers": internal}),
            ]
        );
    }

    #[test]
    fn wildcards() {
        assert!(match_wildcard("a.example.com", "*.example.com"));
        assert!(!match_wildcard("a.b.example.com", "*.example.com"));
        assert!(subject_is_internal("x.home.arpa") && subject_is_internal("127.0.0.1"));
        assert!(!subject_is_internal("a.test"));
    }
}

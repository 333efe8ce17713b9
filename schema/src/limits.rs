//! The bounds every agent's input is held to.
//!
//! Everything an agent sends is untrusted: one container's labels, or one
//! message, must never be able to exhaust the applier's stack, memory or
//! time, nor Caddy's. The publisher checks these bounds before publishing
//! (and drops what exceeds them, with a log line), and the applier checks
//! them again on what it reads, because a publisher can be replaced by
//! anything that holds its credentials.
//!
//! The limits are constants, not settings: they are part of the wire
//! contract between every publisher and every applier of a fleet.

use std::collections::BTreeMap;

use crate::labels::is_caddy_label;

/// Largest message a publisher may store on a container or heartbeat
/// subject (bytes of the encoded JSON).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest `sync` message: it lists every container of its host (about
/// 15,000 IDs fit).
pub const MAX_SYNC_BYTES: usize = 1024 * 1024;
/// Longest label key.
pub const MAX_LABEL_KEY_BYTES: usize = 256;
/// Most dot-separated segments in a label key (`caddy.a.b` has three).
pub const MAX_LABEL_SEGMENTS: usize = 16;
/// Longest label value, and longest value a template may render to.
pub const MAX_LABEL_VALUE_BYTES: usize = 4 * 1024;
/// Most labels under the prefix on one container.
pub const MAX_PREFIX_LABELS: usize = 128;
/// Deepest `{ … }` nesting a parsed Caddyfile may have.
pub const MAX_BLOCK_DEPTH: usize = 64;

/// Input beyond one of the bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{count} labels under the prefix (at most {MAX_PREFIX_LABELS} per container)")]
    TooManyLabels { count: usize },
    #[error("label key {key:?}… is {len} bytes (at most {MAX_LABEL_KEY_BYTES})")]
    KeyTooLong { key: String, len: usize },
    #[error("label {key} has {segments} segments (at most {MAX_LABEL_SEGMENTS})")]
    TooManySegments { key: String, segments: usize },
    #[error("label {key} has a {len}-byte value (at most {MAX_LABEL_VALUE_BYTES})")]
    ValueTooLong { key: String, len: usize },
    #[error("message of {len} bytes (at most {limit})")]
    MessageTooLarge { len: usize, limit: usize },
}

/// The first `max` bytes of `text`, cut at a character boundary: error
/// messages never repeat an attacker's megabytes.
pub fn shortened(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How many segments a label key has: its unescaped dots plus one.
pub fn segments(key: &str) -> usize {
    let bytes = key.as_bytes();
    1 + (0..bytes.len())
        .filter(|&i| bytes[i] == b'.' && (i == 0 || bytes[i - 1] != b'\\'))
        .count()
}

/// Checks the labels under `prefix` against the bounds, in time linear in
/// their size and without recursion. Labels outside the prefix are not
/// read by anything and are not checked.
pub fn check_labels(labels: &BTreeMap<String, String>, prefix: &str) -> Result<(), LimitError> {
    let mut count = 0;
    for (key, value) in labels.iter().filter(|(k, _)| is_caddy_label(k, prefix)) {
        count += 1;
        if count > MAX_PREFIX_LABELS {
            let count = labels.keys().filter(|k| is_caddy_label(k, prefix)).count();
            return Err(LimitError::TooManyLabels { count });
        }
        if key.len() > MAX_LABEL_KEY_BYTES {
            return Err(LimitError::KeyTooLong {
                key: shortened(key, 64).to_string(),
                len: key.len(),
            });
        }
        let segments = segments(key);
        if segments > MAX_LABEL_SEGMENTS {
            return Err(LimitError::TooManySegments {
                key: key.clone(),
                segments,
            });
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(LimitError::ValueTooLong {
                key: key.clone(),
                len: value.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(String, String)]) -> BTreeMap<String, String> {
        pairs.iter().cloned().collect()
    }

    #[test]
    fn segments_count_unescaped_dots() {
        assert_eq!(segments("caddy"), 1);
        assert_eq!(segments("caddy.a.b"), 3);
        assert_eq!(segments("caddy.a\\.b"), 2);
    }

    #[test]
    fn every_bound_is_enforced_with_a_reason() {
        let ok = labels(&[("caddy".into(), "a.test".into())]);
        assert_eq!(check_labels(&ok, "caddy"), Ok(()));

        let long_key = format!("caddy.{}", "a".repeat(MAX_LABEL_KEY_BYTES));
        let err = check_labels(&labels(&[(long_key, "x".into())]), "caddy").unwrap_err();
        assert!(matches!(err, LimitError::KeyTooLong { .. }), "{err}");
        assert!(err.to_string().len() < 200, "{err}");

        let deep = format!("caddy{}", ".a".repeat(MAX_LABEL_SEGMENTS));
        let err = check_labels(&labels(&[(deep, "x".into())]), "caddy").unwrap_err();
        assert!(
            matches!(err, LimitError::TooManySegments { segments: 17, .. }),
            "{err}"
        );

        let big = "x".repeat(MAX_LABEL_VALUE_BYTES + 1);
        let err = check_labels(&labels(&[("caddy.respond".into(), big)]), "caddy").unwrap_err();
        assert!(matches!(err, LimitError::ValueTooLong { .. }), "{err}");

        let many: Vec<_> = (0..=MAX_PREFIX_LABELS)
            .map(|i| (format!("caddy.a{i}"), "x".into()))
            .collect();
        let err = check_labels(&labels(&many), "caddy").unwrap_err();
        assert_eq!(
            err,
            LimitError::TooManyLabels {
                count: MAX_PREFIX_LABELS + 1
            }
        );
    }

    #[test]
    fn labels_outside_the_prefix_are_not_bounded() {
        let other = labels(&[
            (
                "com.example.x".into(),
                "y".repeat(10 * MAX_LABEL_VALUE_BYTES),
            ),
            ("z".repeat(1000), "x".into()),
        ]);
        assert_eq!(check_labels(&other, "caddy"), Ok(()));
    }

    #[test]
    fn shortened_respects_char_boundaries() {
        assert_eq!(shortened("ééé", 3), "é");
        assert_eq!(shortened("abc", 10), "abc");
    }
}

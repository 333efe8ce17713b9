//! JSON text with holes: a share or a config is serialized once with
//! *markers* where values are written later (route group names, a
//! server's routes), then cut at them, so composing writes text between
//! pieces instead of cloning and walking `Value` trees (which take about
//! fifteen times their text's size).
//!
//! A marker is a JSON string `"\u0001caddy-fleet-<kind>\u0001<n>"`.
//! serde_json escapes U+0001 as `\u0001`, so the marker's text can only
//! come from a string holding exactly that value; [`cut`] checks that each
//! marker `0..count` appears once and nothing else looks like one, so a
//! share whose own strings carry such a value is refused, never
//! misspliced.

use serde_json::Value;

/// The string value standing for hole `n` of `kind`.
pub fn marker(kind: &str, n: usize) -> Value {
    Value::String(format!("\u{1}caddy-fleet-{kind}\u{1}{n}"))
}

/// Text cut at its holes: `pieces[0]`, hole `holes[0]`, `pieces[1]`, …
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    pub pieces: Vec<String>,
    /// The number of each hole, in text order.
    pub holes: Vec<usize>,
}

impl Cut {
    /// Writes the text back, each hole filled by `fill` (given its number).
    pub fn write(&self, out: &mut String, mut fill: impl FnMut(&mut String, usize)) {
        for (i, piece) in self.pieces.iter().enumerate() {
            out.push_str(piece);
            if let Some(&n) = self.holes.get(i) {
                fill(out, n);
            }
        }
    }
}

/// Cuts `json`, serialized with holes `0..count` of `kind`, at each of
/// them; `None` unless each appears exactly once.
pub fn cut(json: &str, kind: &str, count: usize) -> Option<Cut> {
    let opening = format!("\"\\u0001caddy-fleet-{kind}\\u0001");
    let mut seen = vec![false; count];
    let mut out = Cut::default();
    let mut rest = json;
    while let Some(at) = rest.find(&opening) {
        let after = &rest[at + opening.len()..];
        let end = after.find('"')?;
        let n: usize = after[..end].parse().ok()?;
        if !std::mem::replace(seen.get_mut(n)?, true) {
            out.pieces.push(rest[..at].to_string());
            out.holes.push(n);
            rest = &after[end + 1..];
        } else {
            return None;
        }
    }
    out.pieces.push(rest.to_string());
    seen.iter().all(|s| *s).then_some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn holes_are_found_in_text_order_and_refilled() {
        let value = json!({"b": [marker("g", 1), {"x": "y"}], "a": marker("g", 0)});
        let text = value.to_string();
        let cut = cut(&text, "g", 2).unwrap();
        assert_eq!(cut.holes, vec![0, 1], "{text}");
        let mut refilled = String::new();
        cut.write(&mut refilled, |out, n| out.push_str(&format!("\"v{n}\"")));
        let back: Value = serde_json::from_str(&refilled).unwrap();
        assert_eq!(back, json!({"b": ["v1", {"x": "y"}], "a": "v0"}));
    }

    #[test]
    fn a_missing_repeated_or_forged_hole_is_refused() {
        let twice = json!([marker("g", 0), marker("g", 0)]).to_string();
        assert_eq!(cut(&twice, "g", 1), None);
        let missing = json!([marker("g", 0)]).to_string();
        assert_eq!(cut(&missing, "g", 2), None);
        let beyond = json!([marker("g", 0), marker("g", 5)]).to_string();
        assert_eq!(cut(&beyond, "g", 1), None);
        // A value that merely looks like a marker counts as one.
        let forged = json!([marker("g", 0), "\u{1}caddy-fleet-g\u{1}0"]).to_string();
        assert_eq!(cut(&forged, "g", 1), None);
        // Escaped text that spells a marker is not one.
        let spelled = json!([marker("g", 0), "\\u0001caddy-fleet-g\\u00010"]).to_string();
        assert!(cut(&spelled, "g", 1).is_some());
        // Another kind's markers are left in the text.
        let other = json!([marker("g", 0), marker("h", 0)]).to_string();
        assert_eq!(cut(&other, "g", 1).map(|c| c.pieces.len()), Some(2));
    }
}

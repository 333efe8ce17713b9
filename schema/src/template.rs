//! The subset of Go's `text/template` that caddy-docker-proxy labels use:
//! text with `{{ … }}` actions holding string literals, numbers, and calls
//! of `upstreams`, `http`, `https` and `h2c`, with `|` pipelines, `{{-`/`-}}`
//! trimming and `{{/* comments */}}`.
//!
//! Anything else is an error that names what was not understood, so the
//! container with that label is left out and the others are not.

/// A template value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// Resolves `{{upstreams [proto] [port]}}` to addresses; the template
/// adds the `proto://` scheme itself.
pub trait Upstreams {
    /// The addresses (`host:port`) reaching container port `port` (or the
    /// container's only port when `None`), or an error to report for the
    /// container.
    fn resolve(&self, port: Option<u16>) -> Result<Vec<String>, String>;
}

/// Renders `template` with `upstreams` as the `upstreams` function.
pub fn render(template: &str, upstreams: &dyn Upstreams) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        let mut action = &rest[start + 2..];
        if let Some(trimmed) = action
            .strip_prefix('-')
            .filter(|a| a.starts_with(char::is_whitespace))
        {
            text = text.trim_end();
            action = trimmed;
        }
        out.push_str(text);
        let Some(end) = find_action_end(action) else {
            return Err("unclosed action".to_string());
        };
        let mut body = &action[..end];
        rest = &action[end + 2..];
        if let Some(trimmed) = body
            .strip_suffix('-')
            .filter(|b| b.ends_with(char::is_whitespace))
        {
            body = trimmed;
            rest = rest.trim_start();
        }
        let body = body.trim();
        if body.starts_with("/*") && body.ends_with("*/") {
            continue;
        }
        match evaluate(body, upstreams)? {
            Value::Str(s) => out.push_str(&s),
            Value::Int(i) => out.push_str(&i.to_string()),
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The index of the `}}` closing an action, skipping quoted strings.
fn find_action_end(action: &str) -> Option<usize> {
    let bytes = action.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'`' {
                    i += 1;
                }
            }
            b'}' if bytes.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Literal(Value),
    Ident(String),
}

fn lex_operands(command: &str) -> Result<Vec<Operand>, String> {
    let mut operands = Vec::new();
    let mut chars = command.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '"' {
            chars.next();
            let mut s = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.next().map(|(_, e)| e) {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some('"') => s.push('"'),
                        Some('\\') => s.push('\\'),
                        Some(other) => return Err(format!("unknown escape sequence \\{other}")),
                        None => break,
                    },
                    c => s.push(c),
                }
            }
            if !closed {
                return Err("unterminated quoted string".to_string());
            }
            operands.push(Operand::Literal(Value::Str(s)));
            continue;
        }
        if c == '`' {
            chars.next();
            let mut s = String::new();
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                if c == '`' {
                    closed = true;
                    break;
                }
                s.push(c);
            }
            if !closed {
                return Err("unterminated raw quoted string".to_string());
            }
            operands.push(Operand::Literal(Value::Str(s)));
            continue;
        }
        let start = i;
        let mut end = command.len();
        while let Some(&(j, c)) = chars.peek() {
            if c.is_whitespace() {
                end = j;
                break;
            }
            chars.next();
        }
        let word = &command[start..end];
        if word.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            let n = word
                .parse::<i64>()
                .map_err(|_| format!("bad number syntax: {word:?}"))?;
            operands.push(Operand::Literal(Value::Int(n)));
        } else if word.starts_with('.') || word.starts_with('$') {
            return Err(format!(
                "{word}: container fields and variables are not available in caddy-fleet labels"
            ));
        } else if word.chars().all(|c| c.is_alphanumeric() || c == '_') {
            operands.push(Operand::Ident(word.to_string()));
        } else {
            return Err(format!("unexpected {word:?} in command"));
        }
    }
    Ok(operands)
}

fn evaluate(pipeline: &str, upstreams: &dyn Upstreams) -> Result<Value, String> {
    if pipeline.is_empty() {
        return Err("missing value for command".to_string());
    }
    let mut previous: Option<Value> = None;
    for command in split_pipeline(pipeline) {
        let mut operands = lex_operands(command)?;
        if operands.is_empty() {
            return Err("missing value for command".to_string());
        }
        let head = operands.remove(0);
        let mut args: Vec<Value> = operands
            .into_iter()
            .map(|operand| match operand {
                Operand::Literal(v) => Ok(v),
                Operand::Ident(name) => call(&name, Vec::new(), upstreams),
            })
            .collect::<Result<_, _>>()?;
        if let Some(piped) = previous.take() {
            args.push(piped);
        }
        previous = Some(match head {
            Operand::Literal(v) if args.is_empty() => v,
            Operand::Literal(_) => return Err("can't give argument to non-function".to_string()),
            Operand::Ident(name) => call(&name, args, upstreams)?,
        });
    }
    previous.ok_or_else(|| "missing value for command".to_string())
}

fn split_pipeline(pipeline: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in pipeline.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '`' => quote = Some(c),
            None if c == '|' => {
                parts.push(&pipeline[start..i]);
                start = i + 1;
            }
            None => {}
        }
    }
    parts.push(&pipeline[start..]);
    parts
}

fn call(name: &str, args: Vec<Value>, upstreams: &dyn Upstreams) -> Result<Value, String> {
    match name {
        "http" | "https" | "h2c" if args.is_empty() => Ok(Value::Str(name.to_string())),
        "http" | "https" | "h2c" => Err(format!(
            "wrong number of args for {name}: want 0 got {}",
            args.len()
        )),
        "upstreams" => {
            let (mut proto, mut port) = (None, None);
            for arg in args {
                match arg {
                    Value::Str(p) => proto = Some(p),
                    Value::Int(p) => {
                        port = Some(
                            u16::try_from(p)
                                .map_err(|_| format!("upstreams: port {p} out of range"))?,
                        )
                    }
                }
            }
            let mut addresses: Vec<String> = upstreams
                .resolve(port)?
                .into_iter()
                .map(|address| match &proto {
                    Some(proto) => format!("{proto}://{address}"),
                    None => address,
                })
                .collect();
            addresses.sort();
            Ok(Value::Str(addresses.join(" ")))
        }
        _ => Err(format!("function {name:?} not defined")),
    }
}

/// Stand-in upstreams for CDP's golden files and `caddy-fleet labels`:
/// fixed targets, with `:port` appended when a port is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixedTargets(pub Vec<String>);

impl Upstreams for FixedTargets {
    fn resolve(&self, port: Option<u16>) -> Result<Vec<String>, String> {
        Ok(self
            .0
            .iter()
            .map(|target| match port {
                Some(port) => format!("{target}:{port}"),
                None => target.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Result<String, String> {
        render(s, &FixedTargets(vec!["target".into()]))
    }

    #[test]
    fn upstreams_forms() {
        assert_eq!(t("{{upstreams}}").unwrap(), "target");
        assert_eq!(t("{{upstreams 80}}").unwrap(), "target:80");
        assert_eq!(
            t("{{ upstreams https 5000 }}").unwrap(),
            "https://target:5000"
        );
        assert_eq!(
            t("{{upstreams \"h2c\" 5000}}").unwrap(),
            "h2c://target:5000"
        );
        assert_eq!(t("{{upstreams h2c 5000}}").unwrap(), "h2c://target:5000");
        assert_eq!(
            t("{{5000 | upstreams http}}").unwrap(),
            "http://target:5000"
        );
    }

    #[test]
    fn several_targets_are_sorted_and_space_joined() {
        let r = render(
            "{{upstreams 80}}",
            &FixedTargets(vec!["b".into(), "a".into()]),
        )
        .unwrap();
        assert_eq!(r, "a:80 b:80");
    }

    #[test]
    fn literals_text_trim_and_comments() {
        assert_eq!(t("{{\"\"}}").unwrap(), "");
        assert_eq!(t("a {{`x y`}} b").unwrap(), "a x y b");
        assert_eq!(t("a   {{- \"b\" -}}   c").unwrap(), "abc");
        assert_eq!(t("x{{/* note */}}y").unwrap(), "xy");
        assert_eq!(t("no actions }} here").unwrap(), "no actions }} here");
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            t("{{invalid}}").unwrap_err(),
            "function \"invalid\" not defined"
        );
        assert_eq!(t("{{upstreams 80").unwrap_err(), "unclosed action");
        assert!(t("{{index .Names 0}}")
            .unwrap_err()
            .contains("not available"));
        assert!(t("{{upstreams 70000}}")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(t("{{}}").unwrap_err(), "missing value for command");
    }
}

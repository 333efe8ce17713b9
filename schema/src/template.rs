//! The subset of Go's `text/template` that caddy-docker-proxy labels use,
//! with the functions its labels can call:
//!
//! - text with `{{ … }}` actions: string, raw-string and number literals,
//!   `|` pipelines, `( … )` sub-expressions, `{{-`/`-}}` trimming and
//!   `{{/* comments */}}`;
//! - `{{if …}}`/`{{else if …}}`/`{{else}}`/`{{end}}` and `{{range …}}` over
//!   a list (`.` is the element inside);
//! - Go's built-ins `printf`, `print`, `println`, `eq`, `ne`, `lt`, `le`,
//!   `gt`, `ge`, `and`, `or`, `not`, `len`, `index`;
//! - sprig's `upper`, `lower`, `title`, `trim`, `trimPrefix`, `trimSuffix`,
//!   `replace`, `default`, `join`, `split`/`splitList`, `contains`,
//!   `hasPrefix`, `hasSuffix`, `quote`, `squote`, `list`;
//! - `upstreams [proto] [port]` and `http`/`https`/`h2c`.
//!
//! No function reads the environment, the clock, randomness or the network,
//! and container fields (`.Names`) are not available: the applier renders
//! far from the container's host. Anything else is an error that names what
//! was not understood, so the container with that label is left out and
//! the others are not. Nesting and output are bounded, whatever the input.

/// A template value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<Value>),
}

impl Value {
    fn truthy(&self) -> bool {
        match self {
            Value::Str(s) => !s.is_empty(),
            Value::Int(i) => *i != 0,
            Value::Bool(b) => *b,
            Value::List(l) => !l.is_empty(),
        }
    }

    fn text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::List(l) => format!(
                "[{}]",
                l.iter().map(Value::text).collect::<Vec<_>>().join(" ")
            ),
        }
    }

    fn string(self, function: &str) -> Result<String, String> {
        match self {
            Value::Str(s) => Ok(s),
            Value::Int(i) => Ok(i.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            Value::List(_) => Err(format!("{function}: a string is needed, not a list")),
        }
    }
}

/// Resolves `{{upstreams [proto] [port]}}` to addresses; the template
/// adds the `proto://` scheme itself.
pub trait Upstreams {
    /// The addresses (`host:port`) reaching container port `port` (or the
    /// container's only port when `None`), or an error to report for the
    /// container.
    fn resolve(&self, port: Option<u16>) -> Result<Vec<String>, String>;
}

/// Deepest nesting of `if`/`range` and of `( … )`.
const MAX_NESTING: usize = 32;
/// Longest output of one template (the label value bound).
const MAX_OUTPUT: usize = crate::limits::MAX_LABEL_VALUE_BYTES;
/// Most iterations of all `range` actions of one template together.
const MAX_ITERATIONS: usize = 4096;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Action(String),
    If {
        branches: Vec<(String, Vec<Node>)>,
        otherwise: Vec<Node>,
    },
    Range {
        pipeline: String,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
}

/// Splits a template into text and action bodies (trimming applied,
/// comments dropped).
fn lex(template: &str) -> Result<Vec<(bool, String)>, String> {
    let mut pieces = Vec::new();
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
        pieces.push((false, text.to_string()));
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
        pieces.push((true, body.to_string()));
    }
    pieces.push((false, rest.to_string()));
    Ok(pieces)
}

/// What ended a list of nodes.
enum Ending {
    End,
    Else(Option<String>),
}

/// Parses pieces into nodes, with an explicit stack of open blocks (no
/// recursion on input).
fn parse(pieces: Vec<(bool, String)>) -> Result<Vec<Node>, String> {
    // Each open block: its kind, what it collected so far.
    enum Open {
        Root,
        If {
            branches: Vec<(String, Vec<Node>)>,
            current: Option<String>,
        },
        Range {
            pipeline: String,
            body: Option<Vec<Node>>,
        },
    }
    let mut stack: Vec<(Open, Vec<Node>)> = vec![(Open::Root, Vec::new())];
    for (is_action, piece) in pieces {
        let ending = if !is_action {
            if !piece.is_empty() {
                if let Some((_, nodes)) = stack.last_mut() {
                    nodes.push(Node::Text(piece));
                }
            }
            continue;
        } else if let Some(cond) = keyword(&piece, "if") {
            if stack.len() > MAX_NESTING {
                return Err(format!("actions nested deeper than {MAX_NESTING}"));
            }
            stack.push((
                Open::If {
                    branches: Vec::new(),
                    current: Some(cond.to_string()),
                },
                Vec::new(),
            ));
            continue;
        } else if let Some(pipeline) = keyword(&piece, "range") {
            if stack.len() > MAX_NESTING {
                return Err(format!("actions nested deeper than {MAX_NESTING}"));
            }
            stack.push((
                Open::Range {
                    pipeline: pipeline.to_string(),
                    body: None,
                },
                Vec::new(),
            ));
            continue;
        } else if piece == "end" {
            Ending::End
        } else if piece == "else" {
            Ending::Else(None)
        } else if let Some(cond) = piece.strip_prefix("else if ") {
            Ending::Else(Some(cond.trim().to_string()))
        } else if ["with", "define", "template", "block", "break", "continue"]
            .iter()
            .any(|k| keyword(&piece, k).is_some() || piece == *k)
        {
            return Err(format!("{piece:?}: not available in caddy-fleet labels"));
        } else {
            if let Some((_, nodes)) = stack.last_mut() {
                nodes.push(Node::Action(piece));
            }
            continue;
        };
        let Some((open, nodes)) = stack.pop() else {
            return Err("unexpected {{end}}".to_string());
        };
        match (open, ending) {
            (Open::Root, _) => return Err("unexpected {{end}} or {{else}}".to_string()),
            (
                Open::If {
                    mut branches,
                    current,
                },
                Ending::Else(next),
            ) => {
                let Some(cond) = current else {
                    return Err("{{else}} after {{else}}".to_string());
                };
                branches.push((cond, nodes));
                stack.push((
                    Open::If {
                        branches,
                        current: next,
                    },
                    Vec::new(),
                ));
            }
            (
                Open::If {
                    mut branches,
                    current,
                },
                Ending::End,
            ) => {
                let otherwise = match current {
                    Some(cond) => {
                        branches.push((cond, nodes));
                        Vec::new()
                    }
                    None => nodes,
                };
                if let Some((_, parent)) = stack.last_mut() {
                    parent.push(Node::If {
                        branches,
                        otherwise,
                    });
                }
            }
            (
                Open::Range {
                    pipeline,
                    body: None,
                },
                Ending::Else(None),
            ) => {
                stack.push((
                    Open::Range {
                        pipeline,
                        body: Some(nodes),
                    },
                    Vec::new(),
                ));
            }
            (Open::Range { pipeline, body }, Ending::End) => {
                let (body, otherwise) = match body {
                    Some(body) => (body, nodes),
                    None => (nodes, Vec::new()),
                };
                if let Some((_, parent)) = stack.last_mut() {
                    parent.push(Node::Range {
                        pipeline,
                        body,
                        otherwise,
                    });
                }
            }
            (Open::Range { .. }, _) => return Err("unexpected {{else}} in range".to_string()),
        }
    }
    match stack.pop() {
        Some((Open::Root, nodes)) if stack.is_empty() => Ok(nodes),
        _ => Err("unexpected EOF: an {{if}} or {{range}} has no {{end}}".to_string()),
    }
}

/// `piece` without its leading `keyword` and the space after it.
fn keyword<'a>(piece: &'a str, keyword: &str) -> Option<&'a str> {
    piece
        .strip_prefix(keyword)
        .filter(|rest| rest.starts_with(char::is_whitespace))
        .map(str::trim)
}

/// Renders `template` with `upstreams` as the `upstreams` function.
pub fn render(template: &str, upstreams: &dyn Upstreams) -> Result<String, String> {
    let nodes = parse(lex(template)?)?;
    let mut out = String::new();
    let mut budget = MAX_ITERATIONS;
    // An explicit work list instead of recursion: (nodes, dot) frames.
    let mut work: Vec<(std::vec::IntoIter<Node>, Option<Value>)> = vec![(nodes.into_iter(), None)];
    while let Some((iter, dot)) = work.last_mut() {
        let Some(node) = iter.next() else {
            work.pop();
            continue;
        };
        let dot = dot.clone();
        match node {
            Node::Text(text) => out.push_str(&text),
            Node::Action(pipeline) => {
                out.push_str(&evaluate(&pipeline, upstreams, dot.as_ref())?.text())
            }
            Node::If {
                branches,
                otherwise,
            } => {
                let mut chosen = otherwise;
                for (cond, body) in branches {
                    if evaluate(&cond, upstreams, dot.as_ref())?.truthy() {
                        chosen = body;
                        break;
                    }
                }
                work.push((chosen.into_iter(), dot));
            }
            Node::Range {
                pipeline,
                body,
                otherwise,
            } => {
                let items = match evaluate(&pipeline, upstreams, dot.as_ref())? {
                    Value::List(items) => items,
                    Value::Int(n) if n >= 0 => (0..n).map(Value::Int).collect(),
                    other => return Err(format!("range can't iterate over {}", other.text())),
                };
                if items.is_empty() {
                    work.push((otherwise.into_iter(), dot));
                    continue;
                }
                budget = budget
                    .checked_sub(items.len())
                    .ok_or_else(|| format!("range: more than {MAX_ITERATIONS} iterations"))?;
                // Pushed in reverse, so the first item renders first.
                for item in items.into_iter().rev() {
                    work.push((body.clone().into_iter(), Some(item)));
                }
            }
        }
        if out.len() > MAX_OUTPUT {
            return Err(format!("the value renders to more than {MAX_OUTPUT} bytes"));
        }
    }
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
    /// `.`: the range element.
    Dot,
    /// `( … )`: a sub-pipeline.
    Group(String),
}

fn lex_operands(command: &str) -> Result<Vec<Operand>, String> {
    let mut operands = Vec::new();
    let mut chars = command.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '(' {
            // The matching `)`, skipping quoted strings.
            let mut depth = 0usize;
            let mut quote: Option<char> = None;
            let mut escaped = false;
            let mut end = None;
            for (j, c) in chars.by_ref() {
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
                    None if c == '(' => depth += 1,
                    None if c == ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(j);
                            break;
                        }
                    }
                    None => {}
                }
            }
            let end = end.ok_or_else(|| "unclosed left paren".to_string())?;
            operands.push(Operand::Group(command[i + 1..end].to_string()));
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
            if c.is_whitespace() || c == '(' {
                end = j;
                break;
            }
            chars.next();
        }
        let word = &command[start..end];
        if word == "." {
            operands.push(Operand::Dot);
        } else if word == "true" || word == "false" {
            operands.push(Operand::Literal(Value::Bool(word == "true")));
        } else if word.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
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

fn evaluate(
    pipeline: &str,
    upstreams: &dyn Upstreams,
    dot: Option<&Value>,
) -> Result<Value, String> {
    evaluate_at(pipeline, upstreams, dot, 0)
}

fn evaluate_at(
    pipeline: &str,
    upstreams: &dyn Upstreams,
    dot: Option<&Value>,
    depth: usize,
) -> Result<Value, String> {
    if depth > MAX_NESTING {
        return Err(format!("parentheses nested deeper than {MAX_NESTING}"));
    }
    if pipeline.trim().is_empty() {
        return Err("missing value for command".to_string());
    }
    let operand = |operand: Operand| -> Result<Value, String> {
        match operand {
            Operand::Literal(v) => Ok(v),
            Operand::Ident(name) => call(&name, Vec::new(), upstreams),
            Operand::Dot => dot.cloned().ok_or_else(|| {
                ".: container fields are not available in caddy-fleet labels".to_string()
            }),
            Operand::Group(inner) => evaluate_at(&inner, upstreams, dot, depth + 1),
        }
    };
    let mut previous: Option<Value> = None;
    for command in split_pipeline(pipeline) {
        let mut operands = lex_operands(command)?;
        if operands.is_empty() {
            return Err("missing value for command".to_string());
        }
        let head = operands.remove(0);
        let mut args: Vec<Value> = operands
            .into_iter()
            .map(operand)
            .collect::<Result<_, _>>()?;
        if let Some(piped) = previous.take() {
            args.push(piped);
        }
        previous = Some(match head {
            Operand::Ident(name) => call(&name, args, upstreams)?,
            other if args.is_empty() => operand(other)?,
            _ => return Err("can't give argument to non-function".to_string()),
        });
    }
    previous.ok_or_else(|| "missing value for command".to_string())
}

fn split_pipeline(pipeline: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut depth = 0usize;
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
            None if c == '(' => depth += 1,
            None if c == ')' => depth = depth.saturating_sub(1),
            None if c == '|' && depth == 0 => {
                parts.push(&pipeline[start..i]);
                start = i + 1;
            }
            None => {}
        }
    }
    parts.push(&pipeline[start..]);
    parts
}

fn arity(name: &str, args: &[Value], want: usize) -> Result<(), String> {
    if args.len() == want {
        Ok(())
    } else {
        Err(format!(
            "wrong number of args for {name}: want {want} got {}",
            args.len()
        ))
    }
}

/// Go's `printf` for the verbs labels use: `%s %d %v %q %%`.
fn printf(args: Vec<Value>) -> Result<Value, String> {
    let mut args = args.into_iter();
    let format = args
        .next()
        .ok_or_else(|| "wrong number of args for printf: want at least 1 got 0".to_string())?
        .string("printf")?;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(verb @ ('s' | 'd' | 'v' | 'q')) => match args.next() {
                Some(value) if verb == 'q' => out.push_str(&format!("{:?}", value.text())),
                Some(value) => out.push_str(&value.text()),
                None => out.push_str(&format!("%!{verb}(MISSING)")),
            },
            Some(other) => return Err(format!("printf: verb %{other} is not supported")),
            None => out.push_str("%!(NOVERB)"),
        }
    }
    Ok(Value::Str(out))
}

fn compare(name: &str, args: Vec<Value>) -> Result<Value, String> {
    arity(name, &args, 2)?;
    let ordering = match (&args[0], &args[1]) {
        (Value::Int(a), Value::Int(b)) => a.cmp(b),
        (Value::Str(a), Value::Str(b)) => a.cmp(b),
        (Value::Bool(a), Value::Bool(b)) if matches!(name, "eq" | "ne") => a.cmp(b),
        _ => return Err(format!("{name}: incompatible types for comparison")),
    };
    use std::cmp::Ordering::*;
    Ok(Value::Bool(match name {
        "eq" => ordering == Equal,
        "ne" => ordering != Equal,
        "lt" => ordering == Less,
        "le" => ordering != Greater,
        "gt" => ordering == Greater,
        _ => ordering != Less,
    }))
}

fn call(name: &str, args: Vec<Value>, upstreams: &dyn Upstreams) -> Result<Value, String> {
    let one_string = |args: Vec<Value>| -> Result<String, String> {
        arity(name, &args, 1)?;
        args.into_iter()
            .next()
            .unwrap_or(Value::Str(String::new()))
            .string(name)
    };
    let two_strings = |args: Vec<Value>| -> Result<(String, String), String> {
        arity(name, &args, 2)?;
        let mut args = args.into_iter();
        let a = args
            .next()
            .unwrap_or(Value::Str(String::new()))
            .string(name)?;
        let b = args
            .next()
            .unwrap_or(Value::Str(String::new()))
            .string(name)?;
        Ok((a, b))
    };
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
                    other => return Err(format!("upstreams: unexpected {}", other.text())),
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
        "printf" => printf(args),
        "print" => Ok(Value::Str(
            args.iter().map(Value::text).collect::<Vec<_>>().concat(),
        )),
        "println" => Ok(Value::Str(format!(
            "{}\n",
            args.iter().map(Value::text).collect::<Vec<_>>().join(" ")
        ))),
        "eq" | "ne" | "lt" | "le" | "gt" | "ge" => compare(name, args),
        "and" | "or" => {
            if args.is_empty() {
                return Err(format!(
                    "wrong number of args for {name}: want at least 1 got 0"
                ));
            }
            let want = name == "or";
            let last = args.len() - 1;
            let mut args = args.into_iter();
            Ok(args
                .by_ref()
                .take(last)
                .find(|a| a.truthy() == want)
                .or_else(|| args.next())
                .unwrap_or(Value::Bool(false)))
        }
        "not" => {
            arity(name, &args, 1)?;
            Ok(Value::Bool(!args[0].truthy()))
        }
        "len" => {
            arity(name, &args, 1)?;
            Ok(Value::Int(match &args[0] {
                Value::Str(s) => s.len() as i64,
                Value::List(l) => l.len() as i64,
                other => return Err(format!("len of {}", other.text())),
            }))
        }
        "index" => {
            let mut args = args.into_iter();
            let mut value = args.next().ok_or_else(|| {
                "wrong number of args for index: want at least 1 got 0".to_string()
            })?;
            for i in args {
                let Value::Int(i) = i else {
                    return Err("index: the index must be a number".to_string());
                };
                value = match value {
                    Value::List(l) => usize::try_from(i)
                        .ok()
                        .and_then(|i| l.into_iter().nth(i))
                        .ok_or_else(|| format!("index: index out of range: {i}"))?,
                    Value::Str(s) => Value::Int(i64::from(
                        *usize::try_from(i)
                            .ok()
                            .and_then(|i| s.as_bytes().get(i))
                            .ok_or_else(|| format!("index: index out of range: {i}"))?,
                    )),
                    other => return Err(format!("index of {}", other.text())),
                };
            }
            Ok(value)
        }
        "upper" => Ok(Value::Str(one_string(args)?.to_uppercase())),
        "lower" => Ok(Value::Str(one_string(args)?.to_lowercase())),
        "title" => Ok(Value::Str(
            one_string(args)?
                .split(' ')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_uppercase().chain(c).collect())
                        .unwrap_or_default()
                })
                .collect::<Vec<String>>()
                .join(" "),
        )),
        "trim" => Ok(Value::Str(one_string(args)?.trim().to_string())),
        "trimPrefix" => {
            let (prefix, s) = two_strings(args)?;
            Ok(Value::Str(
                s.strip_prefix(&prefix).unwrap_or(&s).to_string(),
            ))
        }
        "trimSuffix" => {
            let (suffix, s) = two_strings(args)?;
            Ok(Value::Str(
                s.strip_suffix(&suffix).unwrap_or(&s).to_string(),
            ))
        }
        "contains" => {
            let (needle, s) = two_strings(args)?;
            Ok(Value::Bool(s.contains(&needle)))
        }
        "hasPrefix" => {
            let (prefix, s) = two_strings(args)?;
            Ok(Value::Bool(s.starts_with(&prefix)))
        }
        "hasSuffix" => {
            let (suffix, s) = two_strings(args)?;
            Ok(Value::Bool(s.ends_with(&suffix)))
        }
        "replace" => {
            arity(name, &args, 3)?;
            let mut args = args.into_iter();
            let mut next = || {
                args.next()
                    .unwrap_or(Value::Str(String::new()))
                    .string("replace")
            };
            let (old, new, s) = (next()?, next()?, next()?);
            if old.is_empty() {
                return Err("replace: the string to replace is empty".to_string());
            }
            let replaced = s.replace(&old, &new);
            if replaced.len() > MAX_OUTPUT {
                return Err(format!("replace: result longer than {MAX_OUTPUT} bytes"));
            }
            Ok(Value::Str(replaced))
        }
        "default" => {
            arity(name, &args, 2)?;
            let mut args = args.into_iter();
            let fallback = args.next().unwrap_or(Value::Str(String::new()));
            let given = args.next().unwrap_or(Value::Str(String::new()));
            Ok(if given.truthy() { given } else { fallback })
        }
        "join" => {
            arity(name, &args, 2)?;
            let mut args = args.into_iter();
            let sep = args
                .next()
                .unwrap_or(Value::Str(String::new()))
                .string("join")?;
            match args.next() {
                Some(Value::List(items)) => Ok(Value::Str(
                    items.iter().map(Value::text).collect::<Vec<_>>().join(&sep),
                )),
                Some(other) => Ok(Value::Str(other.text())),
                None => Ok(Value::Str(String::new())),
            }
        }
        "split" | "splitList" => {
            let (sep, s) = two_strings(args)?;
            if sep.is_empty() {
                return Err(format!("{name}: the separator is empty"));
            }
            Ok(Value::List(
                s.split(sep.as_str())
                    .map(|p| Value::Str(p.to_string()))
                    .collect(),
            ))
        }
        "quote" => Ok(Value::Str(
            args.iter()
                .map(|a| format!("{:?}", a.text()))
                .collect::<Vec<_>>()
                .join(" "),
        )),
        "squote" => Ok(Value::Str(
            args.iter()
                .map(|a| format!("'{}'", a.text()))
                .collect::<Vec<_>>()
                .join(" "),
        )),
        "list" => Ok(Value::List(args)),
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
    fn go_builtins_and_sprig_functions() {
        for (template, want) in [
            (r#"{{printf "%s-%d" "web" 8}}"#, "web-8"),
            (r#"{{printf "%q" "a"}}"#, "\"a\""),
            (r#"{{print "a" 1}}"#, "a1"),
            (r#"{{upper "shop"}}"#, "SHOP"),
            (r#"{{"Shop" | lower}}"#, "shop"),
            (r#"{{trim "  x  "}}"#, "x"),
            (r#"{{trimPrefix "www." "www.a.test"}}"#, "a.test"),
            (r#"{{trimSuffix ".test" "a.test"}}"#, "a"),
            (r#"{{replace "." "-" "a.b.c"}}"#, "a-b-c"),
            (r#"{{default "fallback" ""}}"#, "fallback"),
            (r#"{{"" | default "fallback"}}"#, "fallback"),
            (r#"{{join "," (list "a" "b")}}"#, "a,b"),
            (r#"{{index (split "." "a.b.c") 1}}"#, "b"),
            (r#"{{(index (list "x" "y") 0)}}"#, "x"),
            (r#"{{len "abc"}}"#, "3"),
            (r#"{{quote "a b"}}"#, "\"a b\""),
            (r#"{{if eq 1 1}}yes{{else}}no{{end}}"#, "yes"),
            (
                r#"{{if ne "a" "a"}}yes{{else if true}}elif{{else}}no{{end}}"#,
                "elif",
            ),
            (r#"{{if and true (not false)}}t{{end}}"#, "t"),
            (r#"{{or "" "b"}}"#, "b"),
            (
                r#"{{if contains "b" "abc"}}c{{end}}{{if hasPrefix "a" "abc"}}p{{end}}{{if hasSuffix "c" "abc"}}s{{end}}"#,
                "cps",
            ),
            (r#"{{range list "a" "b"}}[{{.}}]{{end}}"#, "[a][b]"),
            (r#"{{range list}}x{{else}}empty{{end}}"#, "empty"),
            (r#"{{range $x := list "a"}}{{end}}"#, ""),
            (
                r#"{{if 1}}{{range list 1 2}}{{if eq . 2}}two{{end}}{{end}}{{end}}"#,
                "two",
            ),
            (r#"{{upstreams 80 | printf "%s/path"}}"#, "target:80/path"),
        ] {
            match t(template) {
                Ok(out) => assert_eq!(out, want, "{template}"),
                // `$x :=` declares a variable: not available, and said so.
                Err(e) => assert!(
                    template.contains('$') && e.contains("not available"),
                    "{template}: {e}"
                ),
            }
        }
    }

    #[test]
    fn control_flow_and_size_are_bounded() {
        assert!(t("{{if 1}}x").unwrap_err().contains("no {{end}}"));
        assert!(t("{{end}}").is_err());
        let deep = "{{if 1}}".repeat(100) + &"{{end}}".repeat(100);
        assert!(t(&deep).unwrap_err().contains("nested deeper"));
        let parens = "{{".to_string() + &"(".repeat(100) + "1" + &")".repeat(100) + "}}";
        assert!(t(&parens).unwrap_err().contains("nested deeper"));
        let big = r#"{{range list 1 2 3 4 5 6 7 8}}{{range list 1 2 3 4 5 6 7 8}}{{range list 1 2 3 4 5 6 7 8}}{{range list 1 2 3 4 5 6 7 8}}xxxxxxxx{{end}}{{end}}{{end}}{{end}}"#;
        let err = t(big).unwrap_err();
        assert!(err.contains("bytes") || err.contains("iterations"), "{err}");
        assert!(t("{{env \"HOME\"}}").unwrap_err().contains("not defined"));
        assert!(t("{{now}}").unwrap_err().contains("not defined"));
        assert!(t("{{with 1}}x{{end}}")
            .unwrap_err()
            .contains("not available"));
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
        assert!(t("{{(index .Names 0)}}")
            .unwrap_err()
            .contains("not available"));
        assert!(t("{{upstreams 70000}}")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(t("{{}}").unwrap_err(), "missing value for command");
    }
}

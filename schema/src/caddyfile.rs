//! A Caddyfile as a tree of blocks: parsing, caddy-docker-proxy's merge and
//! sort, and marshalling in its exact output format (tabs, braces, quoting).
//!
//! A [`Block`] is one line of tokens (`keys`) with optional children in
//! braces. At the top level a block is a site (its keys are addresses), a
//! snippet (`(name)`), a named matcher (`@name`) or, with no keys, the
//! global options.

use std::cmp::Ordering;

use crate::lexer::tokenize;
use crate::limits::MAX_BLOCK_DEPTH;

/// The order of a block with no `N_` prefix: after every prefixed one.
pub const UNORDERED: i64 = i32::MAX as i64;

/// One Caddyfile line and its nested block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The tokens of the line: a directive and its arguments, or a site's
    /// addresses.
    pub keys: Vec<String>,
    /// The lines inside `{ … }`.
    pub children: Vec<Block>,
    /// Sort position among siblings: the `N` of an `N_` label prefix, the
    /// position in a parsed file, or [`UNORDERED`].
    pub order: i64,
}

impl Default for Block {
    fn default() -> Self {
        Block {
            keys: Vec::new(),
            children: Vec::new(),
            order: UNORDERED,
        }
    }
}

impl Block {
    /// A block with these tokens and no children.
    pub fn line<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Block {
            keys: keys.into_iter().map(Into::into).collect(),
            ..Block::default()
        }
    }

    /// Adds a child and returns the block, for building trees in tests.
    pub fn with_child(mut self, child: Block) -> Self {
        self.children.push(child);
        self
    }

    /// The global options block has no keys.
    pub fn is_global(&self) -> bool {
        self.keys.is_empty()
    }

    /// A snippet is one key in parentheses: `(name)`.
    pub fn is_snippet(&self) -> bool {
        self.keys.len() == 1 && self.keys[0].starts_with('(') && self.keys[0].ends_with(')')
    }

    /// A named matcher starts with `@`.
    pub fn is_matcher(&self) -> bool {
        self.keys.first().is_some_and(|k| k.starts_with('@'))
    }

    fn first_key(&self) -> &str {
        self.keys.first().map(String::as_str).unwrap_or("")
    }

    fn sort(&mut self) {
        sort_blocks(&mut self.children);
    }
}

/// A whole Caddyfile: top-level blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caddyfile {
    pub blocks: Vec<Block>,
}

/// A Caddyfile that cannot be read as blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: unexpected '}}'")]
    UnexpectedClose { line: usize },
    #[error("unclosed '{{' opened on line {line}")]
    Unclosed { line: usize },
    #[error("line {line}: blocks nested deeper than {MAX_BLOCK_DEPTH} levels")]
    TooDeep { line: usize },
}

impl Caddyfile {
    /// Reads Caddyfile text into blocks. Each block's order is its position,
    /// so sorting keeps the file's order.
    pub fn parse(text: &str) -> Result<Caddyfile, ParseError> {
        // The stack of open blocks, each with the line that opened it; the
        // bottom one is the file itself.
        let mut stack: Vec<(Block, usize)> = vec![(Block::default(), 0)];
        let mut pending: Option<(Block, usize)> = None;
        fn push_child(parent: &mut Block, mut child: Block) {
            child.order = parent.children.len() as i64;
            parent.children.push(child);
        }
        for token in tokenize(text) {
            if !token.quoted && token.text == "{" {
                if stack.len() > MAX_BLOCK_DEPTH {
                    return Err(ParseError::TooDeep { line: token.line });
                }
                let open = pending.take().unwrap_or((Block::default(), token.line));
                stack.push((open.0, token.line));
            } else if !token.quoted && token.text == "}" {
                if stack.len() < 2 {
                    return Err(ParseError::UnexpectedClose { line: token.line });
                }
                if let (Some((block, _)), Some((top, _))) = (pending.take(), stack.last_mut()) {
                    push_child(top, block);
                }
                if let Some((closed, _)) = stack.pop() {
                    if let Some((top, _)) = stack.last_mut() {
                        push_child(top, closed);
                    }
                }
            } else {
                match &mut pending {
                    Some((block, line)) if *line == token.line => block.keys.push(token.text),
                    _ => {
                        if let (Some((block, _)), Some((top, _))) =
                            (pending.take(), stack.last_mut())
                        {
                            push_child(top, block);
                        }
                        pending = Some((Block::line([token.text]), token.line));
                    }
                }
            }
        }
        if stack.len() > 1 {
            let line = stack.last().map(|(_, line)| *line).unwrap_or(0);
            return Err(ParseError::Unclosed { line });
        }
        let (mut root, _) = stack.pop().unwrap_or_default();
        if let Some((block, _)) = pending {
            push_child(&mut root, block);
        }
        Ok(Caddyfile {
            blocks: root.children,
        })
    }

    /// Merges `other` into this file as caddy-docker-proxy does: a
    /// `reverse_proxy` or `php_fastcgi` with the same matcher gains the
    /// other's upstreams; blocks with identical keys merge recursively (so
    /// equal lines are kept once and global options fold into one); anything
    /// else is appended.
    pub fn merge(&mut self, other: Caddyfile) {
        merge_blocks(&mut self.blocks, other.blocks);
    }

    /// Merges many files in order, as repeated [`Caddyfile::merge`] would,
    /// but finds top-level blocks by their keys in a map instead of a scan,
    /// so merging thousands of containers' sites stays linear.
    pub fn merge_all(&mut self, others: impl IntoIterator<Item = Caddyfile>) {
        let mut index: std::collections::HashMap<Vec<String>, usize> =
            std::collections::HashMap::new();
        for (i, block) in self.blocks.iter().enumerate() {
            index.entry(block.keys.clone()).or_insert(i);
        }
        for other in others {
            for block in other.blocks {
                let directive = block.first_key();
                if directive == "reverse_proxy" || directive == "php_fastcgi" {
                    // The rare top-level proxy line keeps the general rule.
                    merge_blocks(&mut self.blocks, vec![block]);
                    index = self
                        .blocks
                        .iter()
                        .enumerate()
                        .rev()
                        .map(|(i, b)| (b.keys.clone(), i))
                        .collect();
                    continue;
                }
                match index.get(&block.keys) {
                    Some(&i) => merge_blocks(&mut self.blocks[i].children, block.children),
                    None => {
                        index.insert(block.keys.clone(), self.blocks.len());
                        self.blocks.push(block);
                    }
                }
            }
        }
    }

    /// Sorts every level as caddy-docker-proxy does: global options,
    /// snippets, matchers, then by `N_` order, keys and children.
    pub fn sort(&mut self) {
        sort_blocks(&mut self.blocks);
    }

    /// Renders the file, sorted, as caddy-docker-proxy does: one tab per
    /// level, children in braces, tokens quoted only where the lexer needs
    /// it. An empty file renders as an empty string.
    pub fn marshal(&self) -> String {
        let mut sorted = self.clone();
        sorted.sort();
        let mut out = String::new();
        for block in &sorted.blocks {
            write_block(&mut out, block, 0);
        }
        out
    }
}

fn merge_blocks(into: &mut Vec<Block>, blocks: Vec<Block>) {
    'outer: for block in blocks {
        let directive = block.first_key();
        if directive == "reverse_proxy" || directive == "php_fastcgi" {
            let (matcher, offset) = proxy_matcher(&block);
            if let Some(existing) = into
                .iter_mut()
                .find(|a| a.first_key() == directive && proxy_matcher(a).0 == matcher)
            {
                existing.keys.extend(block.keys.into_iter().skip(offset));
                merge_blocks(&mut existing.children, block.children);
                continue 'outer;
            }
        }
        if let Some(existing) = into.iter_mut().find(|a| a.keys == block.keys) {
            merge_blocks(&mut existing.children, block.children);
            continue;
        }
        into.push(block);
    }
}

/// The matcher of a proxy line and where its upstreams start: its first
/// argument if that is `*`, a path or a named matcher; otherwise `*`.
pub fn proxy_matcher(block: &Block) -> (&str, usize) {
    match block.keys.get(1) {
        Some(m) if m == "*" || m.starts_with('/') || m.starts_with('@') => (m, 2),
        _ => ("*", 1),
    }
}

fn sort_blocks(blocks: &mut [Block]) {
    for block in blocks.iter_mut() {
        block.sort();
    }
    blocks.sort_by(compare_blocks);
}

fn compare_blocks(a: &Block, b: &Block) -> Ordering {
    // `true` sorts first for each of these kinds.
    b.is_global()
        .cmp(&a.is_global())
        .then_with(|| b.is_snippet().cmp(&a.is_snippet()))
        .then_with(|| b.is_matcher().cmp(&a.is_matcher()))
        .then_with(|| a.order.cmp(&b.order))
        .then_with(|| a.keys.cmp(&b.keys))
        .then_with(|| {
            a.children
                .iter()
                .zip(&b.children)
                .map(|(x, y)| compare_blocks(x, y))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
        .then_with(|| a.children.len().cmp(&b.children.len()))
}

fn write_block(out: &mut String, block: &Block, depth: usize) {
    for _ in 0..depth {
        out.push('\t');
    }
    for (i, key) in block.keys.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&quote_token(key));
    }
    if !block.children.is_empty() {
        if !block.keys.is_empty() {
            out.push(' ');
        }
        out.push_str("{\n");
        for child in &block.children {
            write_block(out, child, depth + 1);
        }
        for _ in 0..depth {
            out.push('\t');
        }
        out.push('}');
    }
    out.push('\n');
}

/// Quotes one token for the Caddyfile lexer: backticks when it holds a
/// newline or a double quote, double quotes when it holds whitespace.
pub fn quote_token(token: &str) -> String {
    if token.contains('\n') || token.contains('"') {
        format!("`{}`", token.replace('`', "\\`"))
    } else if token.contains(char::is_whitespace) {
        format!("\"{token}\"")
    } else {
        token.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_blocks_use_tabs_and_braces() {
        let file = Caddyfile {
            blocks: vec![Block::line(["localhost"]).with_child(
                Block::line(["group"])
                    .with_child(Block::line(["a", "value-a"]))
                    .with_child(Block::line(["group"]).with_child(Block::line(["b", "value-b"]))),
            )],
        };
        assert_eq!(
            file.marshal(),
            "localhost {\n\tgroup {\n\t\ta value-a\n\t\tgroup {\n\t\t\tb value-b\n\t\t}\n\t}\n}\n"
        );
    }

    #[test]
    fn global_options_have_no_keys() {
        let file = Caddyfile {
            blocks: vec![Block::default().with_child(Block::line(["email", "a@b.c"]))],
        };
        assert_eq!(file.marshal(), "{\n\temail a@b.c\n}\n");
    }

    #[test]
    fn tokens_are_quoted_like_cdp() {
        assert_eq!(quote_token("abcd"), "abcd");
        assert_eq!(quote_token("a b"), "\"a b\"");
        assert_eq!(quote_token("a\"b"), "`a\"b`");
        assert_eq!(quote_token("a\nb"), "`a\nb`");
    }

    #[test]
    fn parse_and_marshal_round_trip_keeping_file_order() {
        let text = "{\n\tadmin 127.0.0.1:2019\n\tauto_https off\n}\n(snip) {\n\ttls internal\n}\nz.test {\n\trespond \"a b\" 200\n\timport snip\n}\na.test {\n\treverse_proxy x:80 {\n\t\thealth_uri /h\n\t}\n}\n";
        let file = Caddyfile::parse(text).unwrap();
        assert_eq!(file.marshal(), text);
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert_eq!(
            Caddyfile::parse("a {\n}\n}").unwrap_err(),
            ParseError::UnexpectedClose { line: 3 }
        );
        assert_eq!(
            Caddyfile::parse("a {\nb {\n}").unwrap_err(),
            ParseError::Unclosed { line: 1 }
        );
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let deep = "a {\n".repeat(1_000_000);
        assert!(matches!(
            Caddyfile::parse(&deep),
            Err(ParseError::TooDeep { .. })
        ));
        let ok = format!(
            "{}{}",
            "a {\n".repeat(MAX_BLOCK_DEPTH),
            "}\n".repeat(MAX_BLOCK_DEPTH)
        );
        assert!(Caddyfile::parse(&ok).is_ok());
    }

    #[test]
    fn merge_all_equals_repeated_merges() {
        let files: Vec<Caddyfile> = [
            "a.test {\n\treverse_proxy x:1\n}\n",
            "{\n\temail a@b.c\n}\nb.test {\n\ttls internal\n}\n",
            "a.test {\n\treverse_proxy y:2\n\ttls internal\n}\n",
            "reverse_proxy /p z:3\n",
            "reverse_proxy /p w:4\nb.test {\n\ttls internal\n}\n",
            "{\n\tdebug\n}\n",
        ]
        .iter()
        .map(|t| Caddyfile::parse(t).unwrap())
        .collect();
        let base =
            Caddyfile::parse("(snip) {\n\ttls internal\n}\na.test {\n\trespond hi\n}\n").unwrap();
        let mut one_by_one = base.clone();
        for f in files.clone() {
            one_by_one.merge(f);
        }
        let mut all = base;
        all.merge_all(files);
        assert_eq!(all, one_by_one);
    }

    #[test]
    fn identical_lines_merge_once_and_globals_fold() {
        let mut a = Caddyfile::parse("{\n\temail a@b.c\n}\nx.test {\n\ttls internal\n}").unwrap();
        a.merge(Caddyfile::parse("{\n\tdebug\n}\nx.test {\n\ttls internal\n}").unwrap());
        // Both options came from line 1 of their file, so they sort by name.
        assert_eq!(
            a.marshal(),
            "{\n\tdebug\n\temail a@b.c\n}\nx.test {\n\ttls internal\n}\n"
        );
    }
}

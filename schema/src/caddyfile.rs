//! A Caddyfile as a tree of blocks: parsing, caddy-docker-proxy's merge and
//! sort, and marshalling in its exact output format (tabs, braces, quoting).
//!
//! A [`Block`] is one line of tokens (`keys`) with optional children in
//! braces. At the top level a block is a site (its keys are addresses), a
//! snippet (`(name)`), a named matcher (`@name`) or, with no keys, the
//! global options.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;

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
    /// Gives every `directive` block, at any depth, the subdirective
    /// `option value` unless it already has an `option` of its own (which
    /// wins).
    pub fn set_default_option(&mut self, directive: &str, option: &str, value: &str) {
        self.set_default_option_unless(directive, option, value, &[]);
    }

    /// [`Self::set_default_option`], also leaving alone the blocks that set
    /// any of the options in `unless` (options that decide the same thing
    /// another way).
    pub fn set_default_option_unless(
        &mut self,
        directive: &str,
        option: &str,
        value: &str,
        unless: &[&str],
    ) {
        fn visit(block: &mut Block, directive: &str, option: &str, value: &str, unless: &[&str]) {
            if block.keys.first().is_some_and(|k| k == directive)
                && !block.children.iter().any(|c| {
                    c.keys
                        .first()
                        .is_some_and(|k| k == option || unless.contains(&k.as_str()))
                })
            {
                block.children.push(Block {
                    keys: vec![option.to_string(), value.to_string()],
                    ..Block::default()
                });
            }
            for child in &mut block.children {
                visit(child, directive, option, value, unless);
            }
        }
        for block in &mut self.blocks {
            visit(block, directive, option, value, unless);
        }
    }

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
                // `line` is where the pending line's last token ended: a
                // token starting there continues it, even after a quoted
                // token that spanned lines.
                match &mut pending {
                    Some((block, line)) if *line == token.line => {
                        block.keys.push(token.text);
                        *line = token.end_line;
                    }
                    _ => {
                        if let (Some((block, _)), Some((top, _))) =
                            (pending.take(), stack.last_mut())
                        {
                            push_child(top, block);
                        }
                        pending = Some((Block::line([token.text]), token.end_line));
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

    /// The top-level blocks in [`Caddyfile::marshal`]'s order, each with
    /// its own text: the texts joined are exactly `marshal()`.
    pub fn marshal_blocks(&self) -> Vec<(Block, String)> {
        let mut sorted = self.clone();
        sorted.sort();
        sorted
            .blocks
            .into_iter()
            .map(|block| {
                let mut text = String::new();
                write_block(&mut text, &block, 0);
                (block, text)
            })
            .collect()
    }

    /// [`Caddyfile::marshal`], and where each top-level block's text is in
    /// it, by the block's index in `self.blocks` (which is not sorted).
    /// What [`merge_marshaled`] reuses.
    pub fn marshal_spans(&self) -> (String, Vec<Range<usize>>) {
        let mut sorted: Vec<(usize, Block)> = self.blocks.iter().cloned().enumerate().collect();
        for (_, block) in &mut sorted {
            block.sort();
        }
        // Stable, as `sort_blocks`.
        sorted.sort_by(|(_, a), (_, b)| compare_blocks(a, b));
        let mut out = String::new();
        let mut spans = vec![0..0; self.blocks.len()];
        for (index, block) in &sorted {
            let start = out.len();
            write_block(&mut out, block, 0);
            spans[*index] = start..out.len();
        }
        (out, spans)
    }
}

/// A Caddyfile with its [`Caddyfile::marshal_spans`].
#[derive(Debug, Clone, Copy)]
pub struct Marshaled<'a> {
    pub file: &'a Caddyfile,
    pub text: &'a str,
    pub spans: &'a [Range<usize>],
}

/// A top-level block and its text, borrowed where it could be.
pub type MarshaledBlock<'a> = (Cow<'a, Block>, Cow<'a, str>);

/// `base` with `files` merged in ([`Caddyfile::merge_all`]), as
/// [`Caddyfile::marshal_blocks`] gives it — without copying, sorting or
/// writing again a top-level block only one file has (at fleet scale,
/// nearly every site): it is borrowed, with the text its file's
/// [`Caddyfile::marshal_spans`] wrote.
///
/// Why it is the same: blocks merge by their keys, and a block no other
/// block merges into is sorted and written alone, so its text is what
/// its own file wrote. Top-level blocks are sorted by kind, order and keys
/// before children, and after merging no two blocks here share keys but
/// duplicates in `base` (which are sorted copies), so the order never
/// depends on a borrowed block's unsorted children. A top-level proxy line
/// merges by its matcher, not its keys: files with one take the general
/// path.
pub fn merge_marshaled<'a>(
    base: Option<&'a Caddyfile>,
    files: &[Marshaled<'a>],
) -> Vec<MarshaledBlock<'a>> {
    let proxy_line = |b: &Block| matches!(b.first_key(), "reverse_proxy" | "php_fastcgi");
    if files.iter().any(|f| f.file.blocks.iter().any(proxy_line)) {
        let mut merged = base.cloned().unwrap_or_default();
        merged.merge_all(files.iter().map(|f| f.file.clone()));
        return merged
            .marshal_blocks()
            .into_iter()
            .map(|(block, text)| (Cow::Owned(block), Cow::Owned(text)))
            .collect();
    }
    /// One top-level block of the result: the first block with its keys
    /// (and its text when a file wrote it), and those merged into it.
    struct Group<'a> {
        first: &'a Block,
        text: Option<&'a str>,
        merged: Vec<&'a Block>,
    }
    let mut groups: Vec<Group> = Vec::new();
    let mut index: std::collections::HashMap<&[String], usize> = std::collections::HashMap::new();
    for block in base.iter().flat_map(|b| &b.blocks) {
        index.entry(&block.keys).or_insert(groups.len());
        groups.push(Group {
            first: block,
            text: None,
            merged: Vec::new(),
        });
    }
    for file in files {
        // Spans written for another shape of the file are not used.
        let spans = match file.spans.len() == file.file.blocks.len() {
            true => file.spans,
            false => &[],
        };
        for (i, block) in file.file.blocks.iter().enumerate() {
            match index.get(block.keys.as_slice()) {
                Some(&group) => groups[group].merged.push(block),
                None => {
                    index.insert(&block.keys, groups.len());
                    groups.push(Group {
                        first: block,
                        // Without a span it is written again.
                        text: spans.get(i).and_then(|span| file.text.get(span.clone())),
                        merged: Vec::new(),
                    });
                }
            }
        }
    }
    let mut out: Vec<MarshaledBlock> = groups
        .into_iter()
        .map(|group| match (group.text, group.merged.is_empty()) {
            (Some(text), true) => (Cow::Borrowed(group.first), Cow::Borrowed(text)),
            _ => {
                let mut block = group.first.clone();
                for other in group.merged {
                    merge_blocks(&mut block.children, other.children.clone());
                }
                block.sort();
                let mut text = String::new();
                write_block(&mut text, &block, 0);
                (Cow::Owned(block), Cow::Owned(text))
            }
        })
        .collect();
    // Stable, as `sort_blocks`.
    out.sort_by(|(a, _), (b, _)| compare_blocks(a, b));
    out
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

/// Quotes one token so that the Caddyfile lexer (ours and Caddy's) reads
/// back exactly this token, never more tokens, a brace, a comment or a
/// heredoc: what a label's author writes cannot break out of its line.
///
/// Like caddy-docker-proxy: backticks when the token holds a newline or a
/// double quote, double quotes when it holds whitespace, bare otherwise.
/// Beyond it, wherever that would be read differently: a bare `{`, `}`,
/// a token starting with `#`, `<<`, a backtick or a backslash, one ending
/// with a backslash, and the empty
/// token are double-quoted; a token holding both a backtick and a double
/// quote is double-quoted with `\"` escapes; a double-quoted token that
/// would end in `\` uses backticks. The few tokens no quoting can carry
/// (see [`is_representable`]) are refused before they get here.
pub fn quote_token(token: &str) -> String {
    let backticked = |t: &str| format!("`{t}`");
    let double_quoted = |t: &str| format!("\"{}\"", t.replace('"', "\\\""));
    let has_backtick = token.contains('`');
    if token.contains('\n') || token.contains('"') {
        if !has_backtick {
            backticked(token)
        } else {
            double_quoted(token)
        }
    } else if token.contains(char::is_whitespace) || needs_quotes_when_bare(token) {
        if token.ends_with('\\') && !has_backtick {
            backticked(token)
        } else {
            double_quoted(token)
        }
    } else {
        token.to_string()
    }
}

/// Whether a token without whitespace or double quotes would be read as
/// something else than itself if written bare.
fn needs_quotes_when_bare(token: &str) -> bool {
    token.is_empty()
        || token == "{"
        || token == "}"
        || token.starts_with('#')
        || token.starts_with("<<")
        || token.starts_with('`')
        || token.starts_with('\\')
        || token.ends_with('\\')
}

/// Whether some quoting carries `token` through the Caddyfile lexer intact.
/// Backticks carry anything but a backtick; double quotes carry anything in
/// which no backslash stands before a double quote, a newline or the end.
pub fn is_representable(token: &str) -> bool {
    if !token.contains('`') {
        return true;
    }
    let bytes = token.as_bytes();
    !token.ends_with('\\')
        && !bytes
            .windows(2)
            .any(|w| w[0] == b'\\' && (w[1] == b'"' || w[1] == b'\n'))
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
    fn marshal_blocks_join_to_marshal() {
        let file = Caddyfile::parse("b.test {\n\trespond b\n}\n(s) {\n\ttls internal\n}\n{\n\tdebug\n}\na.test {\n\timport s\n}\n").unwrap();
        let blocks = file.marshal_blocks();
        let joined: String = blocks.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(joined, file.marshal());
        assert!(blocks[0].0.is_global() && blocks[1].0.is_snippet());
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
        assert_eq!(quote_token("}"), "\"}\"");
        assert_eq!(quote_token("#x"), "\"#x\"");
        assert_eq!(quote_token("<<EOF"), "\"<<EOF\"");
        assert_eq!(quote_token("a`\"b"), "\"a`\\\"b\"");
        assert_eq!(quote_token(""), "\"\"");
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

#[cfg(test)]
mod round_trip {
    use proptest::prelude::*;

    use super::*;

    /// Tokens made of what breaks naive quoting: quotes, backticks,
    /// braces, newlines, `#`, heredoc openers, backslashes, unicode.
    fn token() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("\"".to_string()),
                Just("`".to_string()),
                Just("{".to_string()),
                Just("}".to_string()),
                Just("\n".to_string()),
                Just(" ".to_string()),
                Just("\t".to_string()),
                Just("#".to_string()),
                Just("<<".to_string()),
                Just("\\".to_string()),
                Just("é✓".to_string()),
                "[a-z0-9.:/@*_-]{1,4}",
            ],
            0..6,
        )
        .prop_map(|parts| parts.concat())
        .prop_filter("some quoting can carry it", |t| is_representable(t))
    }

    fn block() -> impl Strategy<Value = Block> {
        let leaf = prop::collection::vec(token(), 1..4).prop_map(Block::line);
        leaf.prop_recursive(3, 24, 4, |inner| {
            (
                prop::collection::vec(token(), 1..4),
                prop::collection::vec(inner, 0..4),
            )
                .prop_map(|(keys, children)| Block {
                    keys,
                    children,
                    order: UNORDERED,
                })
        })
    }

    /// A top-level block whose keys often collide with another file's.
    fn top_block() -> impl Strategy<Value = Block> {
        (
            prop_oneof![
                Just(vec![]),
                Just(vec!["(s)".to_string()]),
                Just(vec!["@m".to_string()]),
                Just(vec!["a.test".to_string()]),
                Just(vec!["b.test".to_string(), "c.test".to_string()]),
                Just(vec!["reverse_proxy".to_string(), "x:1".to_string()]),
                prop::collection::vec(token(), 1..3),
            ],
            prop::collection::vec(block(), 0..4),
            prop_oneof![Just(UNORDERED), 0i64..3],
        )
            .prop_map(|(keys, children, order)| Block {
                keys,
                children,
                order,
            })
    }

    fn file() -> impl Strategy<Value = Caddyfile> {
        prop::collection::vec(top_block(), 0..4).prop_map(|blocks| Caddyfile { blocks })
    }

    proptest! {
        /// Merging files whose blocks were written once gives exactly the
        /// blocks and texts of merging them and writing the whole.
        #[test]
        fn merging_marshaled_files_is_merging_then_marshalling(
            base in prop::option::of(file()),
            files in prop::collection::vec(file(), 0..5),
        ) {
            let written: Vec<(String, Vec<Range<usize>>)> =
                files.iter().map(Caddyfile::marshal_spans).collect();
            for (file, (text, _)) in files.iter().zip(&written) {
                prop_assert_eq!(text, &file.marshal());
            }
            let marshaled: Vec<Marshaled> = files
                .iter()
                .zip(&written)
                .map(|(file, (text, spans))| Marshaled { file, text, spans })
                .collect();
            let fast: Vec<(Block, String)> = merge_marshaled(base.as_ref(), &marshaled)
                .into_iter()
                .map(|(b, t)| (b.into_owned(), t.into_owned()))
                .collect();
            let mut whole = base.clone().unwrap_or_default();
            whole.merge_all(files.iter().cloned());
            let expected = whole.marshal_blocks();
            let texts = |blocks: &[(Block, String)]| blocks.iter().map(|(_, t)| t.clone()).collect::<String>();
            prop_assert_eq!(texts(&fast), texts(&expected));
            let keys = |blocks: &[(Block, String)]| blocks.iter().map(|(b, _)| b.keys.clone()).collect::<Vec<_>>();
            prop_assert_eq!(keys(&fast), keys(&expected));
        }
    }

    fn without_order(blocks: &mut [Block]) {
        for b in blocks {
            b.order = UNORDERED;
            without_order(&mut b.children);
        }
    }

    proptest! {
        /// Whatever the tokens hold, the lexer and parser read back exactly
        /// the tree that was marshalled: no token can open or close a
        /// block, start a comment or a heredoc, or join another line.
        #[test]
        fn marshal_then_parse_gives_the_same_tree(blocks in prop::collection::vec(block(), 1..4)) {
            let file = Caddyfile { blocks };
            let text = file.marshal();
            let mut parsed = Caddyfile::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            let mut expected = file.clone();
            expected.sort();
            without_order(&mut parsed.blocks);
            without_order(&mut expected.blocks);
            prop_assert_eq!(parsed, expected, "{}", text);
        }
    }
}

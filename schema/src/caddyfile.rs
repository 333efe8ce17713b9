//! A Caddyfile as a tree of blocks, and its marshalling in
//! caddy-docker-proxy's exact output format (tabs, braces, quoting).
//!
//! A [`Block`] is one line of tokens (`keys`) with optional children in
//! braces. A top-level block is a site (its keys are addresses), a snippet
//! (`(name)`), a matcher (`@name`) or, with no keys, the global options.

/// One Caddyfile line and its nested block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    /// The tokens of the line: a directive and its arguments, or a site's
    /// addresses.
    pub keys: Vec<String>,
    /// The lines inside `{ … }`.
    pub children: Vec<Block>,
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
            children: Vec::new(),
        }
    }

    /// Adds a child and returns the block, for building trees in tests.
    pub fn with_child(mut self, child: Block) -> Self {
        self.children.push(child);
        self
    }
}

/// A whole Caddyfile: top-level blocks in output order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caddyfile {
    pub blocks: Vec<Block>,
}

impl Caddyfile {
    /// Renders the file as caddy-docker-proxy does: one tab per level,
    /// children in braces, tokens quoted only where the lexer needs it.
    /// An empty file renders as an empty string.
    pub fn marshal(&self) -> String {
        let mut out = String::new();
        for block in &self.blocks {
            write_block(&mut out, block, 0);
        }
        out
    }
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
}

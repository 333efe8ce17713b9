//! The Caddyfile lexer, as caddy-docker-proxy's copy of Caddy's: splits text
//! into tokens on whitespace, with `"…"` quotes (only `\"` is an escape),
//! raw `` `…` `` quotes that may span lines, `#` comments at the start of a
//! token, and `\` + newline to continue a line.

/// One token and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The token's text, quotes removed.
    pub text: String,
    /// The 1-based line the token starts on.
    pub line: usize,
    /// The line it ends on: later than `line` for a quoted token that
    /// spans lines. The next token on this line continues the same line.
    pub end_line: usize,
    /// Whether the token was quoted (a quoted `{` is not a brace).
    pub quoted: bool,
}

/// Splits `text` into tokens. Never fails: an unclosed quote ends at the
/// end of the text, as in Caddy.
pub fn tokenize(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut val = String::new();
    let mut line = 1;
    let mut start_line = 1;
    let mut quoted = false;
    let mut backticked = false;
    let mut was_quoted = false;
    let mut escaped = false;
    let mut comment = false;
    let mut skipped_lines = 0;

    let mut finish = |val: &mut String, was_quoted: &mut bool, start_line: usize, line: usize| {
        tokens.push(Token {
            text: std::mem::take(val),
            line: start_line,
            // A bare token ends where it starts (it is finished by the
            // whitespace after it, newline included); a quoted one at its
            // closing quote.
            end_line: if *was_quoted { line } else { start_line },
            quoted: *was_quoted,
        });
        *was_quoted = false;
    };

    for ch in text.chars() {
        if quoted || backticked {
            if quoted && escaped {
                // Everything is literal inside quotes, except an escaped quote.
                if ch != '"' {
                    val.push('\\');
                }
                escaped = false;
            } else if (quoted && ch == '"') || (backticked && ch == '`') {
                quoted = false;
                backticked = false;
                finish(&mut val, &mut was_quoted, start_line, line);
                continue;
            } else if quoted && ch == '\\' {
                escaped = true;
                continue;
            }
            if ch == '\n' {
                line += 1 + skipped_lines;
                skipped_lines = 0;
            }
            val.push(ch);
            continue;
        }

        if ch.is_whitespace() {
            if ch == '\r' {
                continue;
            }
            if ch == '\n' {
                if escaped {
                    // `\` + newline chains arguments onto the next line.
                    skipped_lines += 1;
                    escaped = false;
                } else {
                    line += 1 + skipped_lines;
                    skipped_lines = 0;
                    comment = false;
                }
            }
            if escaped {
                // A backslash before other whitespace ends its token.
                val.push('\\');
                escaped = false;
            }
            if !val.is_empty() {
                finish(&mut val, &mut was_quoted, start_line, line);
            }
            continue;
        }

        if ch == '#' && val.is_empty() {
            comment = true;
        }
        if comment {
            continue;
        }

        if val.is_empty() {
            start_line = line;
            if ch == '"' {
                quoted = true;
                was_quoted = true;
                continue;
            }
            if ch == '`' {
                backticked = true;
                was_quoted = true;
                continue;
            }
        }

        if escaped {
            val.push('\\');
            escaped = false;
        }
        if ch == '\\' {
            escaped = true;
            continue;
        }
        val.push(ch);
    }
    if !val.is_empty() || quoted || backticked {
        if escaped {
            val.push('\\');
        }
        // An unclosed quote still yields what it collected, unless empty.
        if !val.is_empty() {
            finish(&mut val, &mut was_quoted, start_line, line);
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(s: &str) -> Vec<String> {
        tokenize(s).into_iter().map(|t| t.text).collect()
    }

    #[test]
    fn splits_on_whitespace() {
        assert_eq!(texts("a  b\tc\nd"), ["a", "b", "c", "d"]);
    }

    #[test]
    fn double_quotes_only_escape_quotes() {
        assert_eq!(texts(r#""a b" "a\"b" "a\nb""#), ["a b", "a\"b", "a\\nb"]);
    }

    #[test]
    fn backticks_are_raw_and_span_lines() {
        assert_eq!(
            texts("`{\"some\":\"json\"}` `a\nb` cd"),
            ["{\"some\":\"json\"}", "a\nb", "cd"]
        );
    }

    #[test]
    fn unbalanced_quotes_behave_like_caddy() {
        assert_eq!(texts("\"a"), ["a"]);
        assert_eq!(texts("a\""), ["a\""]);
    }

    #[test]
    fn comments_start_at_a_token() {
        assert_eq!(texts("a #b c\nd a#b"), ["a", "d", "a#b"]);
    }

    #[test]
    fn backslash_newline_continues_the_line() {
        let tokens = tokenize("a \\\nb\nc");
        assert_eq!(tokens.iter().map(|t| t.line).collect::<Vec<_>>(), [1, 1, 3]);
    }

    #[test]
    fn multi_line_tokens_know_where_they_end() {
        let tokens = tokenize("a `x\ny` b\nc");
        let lines: Vec<_> = tokens.iter().map(|t| (t.line, t.end_line)).collect();
        assert_eq!(lines, [(1, 1), (1, 2), (2, 2), (3, 3)]);
    }

    #[test]
    fn quoted_braces_are_marked() {
        let tokens = tokenize("\"{\" {");
        assert!(tokens[0].quoted && !tokens[1].quoted);
    }
}

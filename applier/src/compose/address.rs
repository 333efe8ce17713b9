//! Site addresses and listener addresses as Caddy's Caddyfile adapter
//! reads them (`httpcaddyfile.ParseAddress`, `Address.Normalize`,
//! `specificity`, `listenersUseAnyPortOtherThan`).

/// A site address: `[scheme://]host[:port][/path]`, normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The key as written (a trailing comma removed).
    pub original: String,
    pub scheme: String,
    pub host: String,
    pub port: String,
    pub path: String,
}

/// Parses one site key as Caddy does, normalized (lower case). `None` for
/// a key Caddy would refuse or that this module does not reproduce
/// exactly (placeholders, IPv6 hosts, odd characters): such a site is
/// adapted with the whole config instead.
pub fn parse_key(key: &str) -> Option<Address> {
    let key = key.trim();
    if key.is_empty()
        || key.contains(['{', '}', ',', '[', ']', '\\', '"', '`', '@', '&', '('])
        || key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return None;
    }
    let (scheme, rest) = match key.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => (String::new(), key),
    };
    if !matches!(scheme.as_str(), "" | "http" | "https") {
        return None;
    }
    let (hostport, path) = match rest.split_once('/') {
        Some((hostport, path)) => (hostport, format!("/{path}")),
        None => (rest, String::new()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => {
            if host.contains(':') {
                return None;
            }
            (host, port)
        }
        None => (hostport, ""),
    };
    if !port.is_empty() && port.parse::<u16>().is_err() {
        return None;
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*'))
    {
        return None;
    }
    Some(Address {
        original: key.to_string(),
        scheme,
        host: host.to_ascii_lowercase(),
        port: port.to_string(),
        path,
    })
}

/// The site keys of a block as Caddy's parser takes them: one trailing
/// comma dropped from each token. `None` if any key is not reproduced.
pub fn parse_keys(keys: &[String]) -> Option<(Vec<String>, Vec<Address>)> {
    let mut texts = Vec::new();
    let mut addresses = Vec::new();
    for key in keys {
        let text = key.strip_suffix(',').unwrap_or(key);
        addresses.push(parse_key(text)?);
        texts.push(text.to_string());
    }
    (!addresses.is_empty()).then_some((texts, addresses))
}

/// The length of `s` less its wildcards (no placeholders reach here).
pub fn specificity(s: &str) -> usize {
    s.len() - s.matches('*').count()
}

/// Whether any listener address uses a port other than `port`
/// (an address Caddy cannot parse is skipped, as Caddy does).
pub fn listeners_use_any_port_other_than(listeners: &[String], port: u16) -> bool {
    listeners.iter().any(|l| match port_range(l) {
        Some((start, end)) => port < start || port > end,
        None => false,
    })
}

/// The port range of a listener address (`[network/]host:port[-port]`);
/// Unix sockets have none (0–0).
fn port_range(listener: &str) -> Option<(u16, u16)> {
    let (network, address) = match listener.split_once('/') {
        Some((network, address)) if !network.contains(':') => {
            (network.to_ascii_lowercase(), address)
        }
        _ => (String::new(), listener),
    };
    if network.starts_with("unix") || network == "fd" || network == "fdgram" {
        return Some((0, 0));
    }
    let (_, port) = address.rsplit_once(':')?;
    match port.split_once('-') {
        Some((start, end)) => Some((start.parse().ok()?, end.parse().ok()?)),
        None => {
            let port = port.parse().ok()?;
            Some((port, port))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(scheme: &str, host: &str, port: &str, path: &str) -> Address {
        Address {
            original: String::new(),
            scheme: scheme.into(),
            host: host.into(),
            port: port.into(),
            path: path.into(),
        }
    }

    #[test]
    fn keys_parse_like_caddy() {
        let strip = |a: Option<Address>| {
            a.map(|a| Address {
                original: String::new(),
                ..a
            })
        };
        assert_eq!(strip(parse_key("A.Test")), Some(addr("", "a.test", "", "")));
        assert_eq!(
            strip(parse_key("http://a.test:8080/x/y")),
            Some(addr("http", "a.test", "8080", "/x/y"))
        );
        assert_eq!(strip(parse_key(":8443")), Some(addr("", "", "8443", "")));
        assert_eq!(
            strip(parse_key("*.example.com")),
            Some(addr("", "*.example.com", "", ""))
        );
        for bad in ["{$HOST}", "ws://a", "a.test:99999", "[::1]:80", "a b", "@m"] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
        let (texts, _) = parse_keys(&["a.test,".into(), "b.test".into()]).unwrap();
        assert_eq!(texts, ["a.test", "b.test"]);
    }

    #[test]
    fn listener_ports() {
        assert!(!listeners_use_any_port_other_than(&[":80".into()], 80));
        assert!(listeners_use_any_port_other_than(&[":443".into()], 80));
        assert!(!listeners_use_any_port_other_than(
            &["tcp/:80-81".into()],
            80
        ));
        assert!(listeners_use_any_port_other_than(&["unix//x".into()], 80));
        assert!(!listeners_use_any_port_other_than(&["weird".into()], 80));
        assert_eq!(specificity("*.a.test"), 7);
    }
}

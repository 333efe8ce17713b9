//! The host address default: the IPv4 address of the interface that holds
//! the default route, as other hosts most likely reach this one.

use std::net::{Ipv4Addr, UdpSocket};

/// The gateway of the default route in `/proc/net/route` text, if any.
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    route_table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags …; destination 0 = default route.
        if fields.len() > 3 && fields[1] == "00000000" {
            let raw = u32::from_str_radix(fields[2], 16).ok()?;
            // The file holds the address in host (little-endian) byte order.
            Some(Ipv4Addr::from(raw.swap_bytes()))
        } else {
            None
        }
    })
}

/// The local address the kernel would use to reach the default gateway.
/// `connect` on a UDP socket only picks a route; nothing is sent.
pub fn detect() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let gateway = default_gateway(&table)?;
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect((gateway, 9)).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
        _ => None,
    }
}

/// Whether `value` can be a host address: an IP address or a DNS name.
pub fn is_valid_address(value: &str) -> bool {
    if value.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_default_gateway() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_gateway(table), Some(Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
    }

    #[test]
    fn host_addresses_are_ips_or_dns_names() {
        for ok in ["10.0.0.2", "::1", "host-a.example.com", "web1"] {
            assert!(is_valid_address(ok), "{ok}");
        }
        for bad in ["", "http://x", "a b", "-a.com", "a..b", "x:80"] {
            assert!(!is_valid_address(bad), "{bad}");
        }
    }
}

//! What a guest's traffic may reach.
//!
//! A guest's network is QEMU's user-mode stack: every connection the guest
//! makes becomes a socket of its QEMU process on the host. So a firewall
//! rule on the sockets of the VMs' uids ([`crate::identity`]) decides what
//! guests reach: an nftables table, `inet strata_guests`, whose output
//! chain refuses their new connections to any address of this host
//! (loopback, its interfaces: strata's API, etcd, the S3 store, other
//! sessions' forwarded ports) and to private, link-local, metadata and
//! reserved networks, leaving only the outside world and the host's DNS
//! resolvers (QEMU forwards the guest's DNS to them). Packets answering a
//! connection made *to* a VM (a forwarded port) pass: they are the reply
//! direction of a connection the host opened.
//!
//! nftables rules belong to a network namespace: each server (a cluster
//! agent in its own namespace included) installs the table in its own.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::identity::IdRange;
use crate::Error;

/// The table's name (family `inet`).
pub const TABLE: &str = "strata_guests";

/// IPv4 networks no guest reaches: this network, private, shared, loopback,
/// link-local (and the 169.254.169.254 metadata service), protocol
/// assignments, benchmarking, multicast, reserved. (The documentation
/// networks are not routed on the internet; where they are used, they are
/// the outside world.)
pub const DENIED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

/// IPv6 networks no guest reaches: unspecified, loopback, IPv4-mapped,
/// unique-local, link-local, multicast.
pub const DENIED_V6: &[&str] = &["::/127", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8"];

/// The operator's own networks no guest reaches either (a cluster's
/// services on public addresses, say): `STRATA_GUEST_DENY`, comma-separated
/// `ADDRESS/PREFIX`.
pub const DENY_ENV: &str = "STRATA_GUEST_DENY";

/// Parses a list of networks, IPv4 and IPv6 apart.
///
/// # Errors
/// [`Error::Setup`] naming the entry that is not `ADDRESS/PREFIX`.
pub fn parse_networks(list: &str) -> Result<(Vec<String>, Vec<String>), Error> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad =
            || Error::Setup(format!("{DENY_ENV}: {entry:?} is not a network (ADDRESS/PREFIX, e.g. 203.0.113.0/24)"));
        let (addr, prefix) = entry.split_once('/').ok_or_else(bad)?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        match addr.parse::<std::net::IpAddr>().map_err(|_| bad())? {
            std::net::IpAddr::V4(a) if prefix <= 32 => v4.push(format!("{a}/{prefix}")),
            std::net::IpAddr::V6(a) if prefix <= 128 => v6.push(format!("{a}/{prefix}")),
            _ => return Err(bad()),
        }
    }
    Ok((v4, v6))
}

/// The nameservers of a resolv.conf text, IPv4 and IPv6 apart.
pub fn nameservers(resolv_conf: &str) -> (Vec<String>, Vec<String>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for l in resolv_conf.lines() {
        let mut f = l.split_whitespace();
        if f.next() != Some("nameserver") {
            continue;
        }
        match f.next().map(str::parse::<std::net::IpAddr>) {
            Some(Ok(std::net::IpAddr::V4(a))) => v4.push(a.to_string()),
            Some(Ok(std::net::IpAddr::V6(a))) => v6.push(a.to_string()),
            _ => {}
        }
    }
    (v4, v6)
}

/// The nftables script that (re)makes the table for the VMs of `range`,
/// letting DNS through to `dns` (IPv4, IPv6). One transaction: the table is
/// replaced whole, never seen half-made.
pub fn ruleset(range: &IdRange, dns: &(Vec<String>, Vec<String>), extra: &(Vec<String>, Vec<String>)) -> String {
    let who = format!("meta skuid {}-{}", range.uid_start, range.uid_end());
    let mut s = String::new();
    s.push_str(&format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"));
    s.push_str("  chain output {\n    type filter hook output priority filter; policy accept;\n");
    // Answers on connections made to a VM (its forwarded ports).
    s.push_str(&format!("    {who} ct direction reply accept\n"));
    for (family, servers) in [("ip", &dns.0), ("ip6", &dns.1)] {
        if !servers.is_empty() {
            let set = servers.join(", ");
            s.push_str(&format!("    {who} {family} daddr {{ {set} }} udp dport 53 accept\n"));
            s.push_str(&format!("    {who} {family} daddr {{ {set} }} tcp dport 53 accept\n"));
        }
    }
    s.push_str(&format!("    {who} fib daddr type local reject\n"));
    let v4: Vec<&str> = DENIED_V4.iter().copied().chain(extra.0.iter().map(String::as_str)).collect();
    let v6: Vec<&str> = DENIED_V6.iter().copied().chain(extra.1.iter().map(String::as_str)).collect();
    s.push_str(&format!("    {who} ip daddr {{ {} }} reject\n", v4.join(", ")));
    s.push_str(&format!("    {who} ip6 daddr {{ {} }} reject\n", v6.join(", ")));
    s.push_str("  }\n}\n");
    s
}

/// Installs (or replaces) the table in this network namespace.
///
/// # Errors
/// [`Error::Setup`] if `nft` is missing or refuses the rules.
pub fn install(range: &IdRange) -> Result<(), Error> {
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let extra = parse_networks(&std::env::var(DENY_ENV).unwrap_or_default())?;
    let script = ruleset(range, &nameservers(&resolv), &extra);
    let fail = |why: String| {
        Error::Setup(format!(
            "the firewall that keeps guests off this host's addresses could not be installed ({why}): \
             install nftables (`apt-get install nftables`) and run strata as root"
        ))
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| fail(format!("nft: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_by_family() {
        let (v4, v6) = nameservers("# x\nnameserver 10.255.255.53\nnameserver ::1\nnameserver junk\nsearch a\n");
        assert_eq!(v4, vec!["10.255.255.53"]);
        assert_eq!(v6, vec!["::1"]);
    }

    #[test]
    fn the_ruleset_names_the_range_lets_replies_and_dns_through_and_refuses_the_rest() {
        let r = IdRange { uid_start: 2_000_000, gid_start: 2_000_000, count: 65536 };
        let s = ruleset(&r, &(vec!["10.0.0.2".into()], vec![]), &(vec!["203.0.113.0/24".into()], vec![]));
        assert!(s.starts_with("table inet strata_guests\ndelete table inet strata_guests\n"), "{s}");
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        let pos =
            |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {s}"));
        assert!(lines.iter().filter(|l| l.starts_with("meta skuid")).all(|l| l.contains("2000000-2065535")));
        assert!(pos("ct direction reply accept") < pos("fib daddr type local reject"));
        assert!(pos("udp dport 53 accept") < pos("ip daddr { 0.0.0.0/8"));
        assert!(s.contains("169.254.0.0/16") && s.contains("127.0.0.0/8") && s.contains("fe80::/10"));
        assert!(!s.contains("ip6 daddr {  }"), "no empty DNS set: {s}");
        assert!(s.contains("224.0.0.0/3, 203.0.113.0/24 }"), "the operator's networks are added: {s}");
    }

    #[test]
    fn the_operators_networks_are_checked() {
        let (v4, v6) = parse_networks(" 203.0.113.0/24, 2001:db8::/32 ,").unwrap();
        assert_eq!((v4, v6), (vec!["203.0.113.0/24".to_string()], vec!["2001:db8::/32".to_string()]));
        for bad in ["10.0.0.0", "10.0.0.0/33", "nowhere/8", "::/129"] {
            let e = parse_networks(bad).unwrap_err().to_string();
            assert!(e.contains("STRATA_GUEST_DENY") && e.contains(bad), "{e}");
        }
    }
}

//! Attach tickets: how a control plane lets a terminal attach straight to
//! the server running its session, without that server knowing the
//! terminal's API token. A ticket is an HMAC-SHA256, keyed with the
//! cluster's secret (which control planes and servers share), over the
//! session, its terminal and an expiry; the server checks it in constant
//! time. Terminal bytes then flow between the terminal and that server only.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How long a ticket is good for: enough to open the connection, no more.
pub const TICKET_LIFETIME_S: u64 = 60;

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn mac(secret: &str, session: &str, terminal: &str, expires: u64) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    // NUL-separated: neither an id nor a terminal name can hold a NUL.
    m.update(format!("attach\0{session}\0{terminal}\0{expires}").as_bytes());
    m
}

/// A ticket for `terminal` to attach to `session`: `EXPIRES.HEXMAC`.
pub fn sign(secret: &str, session: &str, terminal: &str) -> String {
    let expires = now_s() + TICKET_LIFETIME_S;
    format!("{expires}.{}", hex::encode(mac(secret, session, terminal, expires).finalize().into_bytes()))
}

/// Whether `ticket` lets `terminal` attach to `session` now.
pub fn verify(secret: &str, session: &str, terminal: &str, ticket: &str) -> bool {
    let Some((expires, tag)) = ticket.split_once('.') else { return false };
    let (Ok(expires), Ok(tag)) = (expires.parse::<u64>(), hex::decode(tag)) else { return false };
    if expires < now_s() {
        return false;
    }
    mac(secret, session, terminal, expires).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_one_session_for_one_terminal_until_it_expires() {
        let t = sign("cluster-secret", "s1", "alice");
        assert!(verify("cluster-secret", "s1", "alice", &t));
        assert!(!verify("cluster-secret", "s2", "alice", &t), "another session");
        assert!(!verify("cluster-secret", "s1", "bob", &t), "another terminal");
        assert!(!verify("other-secret", "s1", "alice", &t), "another cluster");
        let (exp, tag) = t.split_once('.').unwrap();
        let later = format!("{}.{tag}", exp.parse::<u64>().unwrap() + 3600);
        assert!(!verify("cluster-secret", "s1", "alice", &later), "a stretched expiry");
        let stale = format!("{}.{}", 1, hex::encode(mac("cluster-secret", "s1", "alice", 1).finalize().into_bytes()));
        assert!(!verify("cluster-secret", "s1", "alice", &stale), "expired");
        for junk in ["", ".", "x.y", "1.zz", "99999999999.00"] {
            assert!(!verify("cluster-secret", "s1", "alice", junk), "{junk:?}");
        }
    }
}

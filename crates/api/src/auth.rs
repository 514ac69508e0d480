//! API tokens. The server keeps only their sha256; a token names the
//! terminal that holds it, and every session belongs to one terminal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// A fresh random token (32 bytes from the kernel, hex).
///
/// # Errors
/// If the kernel's random source cannot be read.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// sha256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `token` hashes to `hash`, in constant time.
pub fn matches(token: &str, hash: &[u8; 32]) -> bool {
    token_hash(token).ct_eq(hash).into()
}

/// One token as the file stores it: its hash, with an expiry or without
/// (the older form, a bare hash, never expires).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Stored {
    Hash(String),
    Expiring { hash: String, expires: u64 },
}

/// A token's hash and its expiry (Unix seconds).
#[derive(Clone, Copy)]
struct Entry {
    hash: [u8; 32],
    expires: Option<u64>,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Unknown,
    Expired,
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The token file: terminal name -> sha256 of its token (hex), and its expiry.
pub struct TokenStore {
    path: PathBuf,
    hashes: BTreeMap<String, Entry>,
}

impl TokenStore {
    /// Loads the token file (an absent file means no tokens).
    ///
    /// # Errors
    /// If the file exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<TokenStore, String> {
        let raw: BTreeMap<String, Stored> = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut hashes = BTreeMap::new();
        for (name, stored) in raw {
            let (h, expires) = match stored {
                Stored::Hash(h) => (h, None),
                Stored::Expiring { hash, expires } => (hash, Some(expires)),
            };
            let bytes = hex::decode(&h).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
            let hash = bytes.ok_or_else(|| format!("{}: bad hash for {name}", path.display()))?;
            hashes.insert(name, Entry { hash, expires });
        }
        Ok(TokenStore { path: path.into(), hashes })
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Creates (or replaces) the token of a terminal, valid for `valid_for`
    /// (for ever if `None`), and returns it; the file is rewritten
    /// atomically, readable by root only.
    ///
    /// # Errors
    /// If the name is invalid or the file cannot be written.
    pub fn create(&mut self, name: &str, valid_for: Option<std::time::Duration>) -> Result<String, String> {
        if !valid_terminal(name) {
            return Err(format!("{name:?} is not a valid terminal name (letters, digits, - _ ., up to 64)"));
        }
        // Other strata processes may create tokens at the same time: take
        // the lock, re-read, add, write a private temporary file, rename.
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| e.to_string())?;
        lock.lock().map_err(|e| e.to_string())?;
        self.hashes = TokenStore::load(&self.path)?.hashes;
        let token = new_token().map_err(|e| e.to_string())?;
        let expires = valid_for.map(|d| now_s().saturating_add(d.as_secs()));
        self.hashes.insert(name.into(), Entry { hash: token_hash(&token), expires });
        let raw: BTreeMap<&String, Stored> = self
            .hashes
            .iter()
            .map(|(k, e)| {
                let hash = hex::encode(e.hash);
                (k, e.expires.map_or(Stored::Hash(hash.clone()), |expires| Stored::Expiring { hash, expires }))
            })
            .collect();
        let tmp = self.path.with_extension(format!("tmp.{}", std::process::id()));
        let data = serde_json::to_vec_pretty(&raw).expect("serializes");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| e.to_string())?;
            f.write_all(&data).map_err(|e| e.to_string())?;
            f.sync_all().map_err(|e| e.to_string())?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| e.to_string())?;
        Ok(token)
    }

    /// The terminal a token belongs to. Every stored hash is compared (in
    /// constant time each), so timing reveals neither the match nor its place.
    pub fn terminal_of(&self, token: &str) -> Option<String> {
        self.check(token).ok()
    }

    /// The terminal a valid token belongs to, or why it is refused.
    ///
    /// # Errors
    /// [`Refused::Unknown`] for a token no terminal has, [`Refused::Expired`]
    /// for one past its expiry.
    pub fn check(&self, token: &str) -> Result<String, Refused> {
        let mut found = None;
        for (name, e) in &self.hashes {
            if matches(token, &e.hash) {
                found = Some((name.clone(), e.expires));
            }
        }
        match found {
            None => Err(Refused::Unknown),
            Some((_, Some(exp))) if exp <= now_s() => Err(Refused::Expired),
            Some((name, _)) => Ok(name),
        }
    }
}

/// Whether `name` may name a terminal: 1-64 of letters, digits, `-_.`.
pub fn valid_terminal(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The authenticated caller: the terminal its token names.
pub struct Caller(pub String);

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

impl FromRequestParts<std::sync::Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &std::sync::Arc<AppState>) -> Result<Caller, ApiError> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        // A control plane, acting for the terminal it names.
        if state.cluster.as_ref().is_some_and(|l| l.is_secret(token)) {
            let name = parts
                .headers
                .get(crate::cluster::TERMINAL_HEADER)
                .and_then(|h| h.to_str().ok())
                .filter(|n| valid_terminal(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "a control plane's request must name its terminal in {}",
                        crate::cluster::TERMINAL_HEADER
                    ))
                })?;
            return Ok(Caller(name.to_string()));
        }
        let tokens = state.tokens.read().unwrap_or_else(|e| e.into_inner());
        match tokens.check(token) {
            Ok(name) => Ok(Caller(name)),
            Err(Refused::Unknown) => Err(ApiError::unauthorized()),
            Err(Refused::Expired) => Err(ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "token_expired",
                "this API token has expired; create a new one with `strata token create TERMINAL`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_recognized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mut store = TokenStore::load(&path).unwrap();
        assert!(store.is_empty());
        let t = store.create("alice", None).unwrap();
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(!raw.contains(&t), "token stored in clear");
        let reloaded = TokenStore::load(&path).unwrap();
        assert_eq!(reloaded.terminal_of(&t).as_deref(), Some("alice"));
        assert_eq!(reloaded.terminal_of("wrong"), None);
        assert_eq!(reloaded.terminal_of(""), None);
        assert!(store.create("bad name", None).is_err());
        // An expired token is told apart from an unknown one.
        let old = store.create("bob", Some(std::time::Duration::ZERO)).unwrap();
        let fresh = store.create("carol", Some(std::time::Duration::from_secs(3600))).unwrap();
        let reloaded = TokenStore::load(&path).unwrap();
        assert_eq!(reloaded.check(&old), Err(Refused::Expired));
        assert_eq!(reloaded.check(&fresh).as_deref(), Ok("carol"));
        assert_eq!(reloaded.check(&t).as_deref(), Ok("alice"));
        assert_eq!(reloaded.check("nope"), Err(Refused::Unknown));
    }
}

//! HTTPS for `strata serve --tls`: the server's certificate and key, given
//! as PEM files or, by default, a self-signed certificate made once and
//! kept in the state directory (clients trust it with `--ca-cert`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The provider every TLS configuration of strata uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration from a PEM certificate chain and key.
///
/// # Errors
/// If a file cannot be read, holds no certificate or key, or they do not match.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("reading the certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("reading the key {}: {e}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate {} and its key do not go together: {e}", cert.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The self-signed certificate and key in `dir` (`cert.pem`, `key.pem`),
/// made on first use for localhost, the loopback addresses, this host's
/// name and `extra` names. Returns their paths.
///
/// # Errors
/// If they cannot be made or written.
pub fn self_signed(dir: &Path, extra: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        names.push(h.trim().to_string());
    }
    names.extend(extra.iter().cloned());
    names.retain(|n| !n.is_empty());
    names.dedup();
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| format!("making a certificate: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    // The key first, private from the start; each file lands whole or not at all.
    write_new(&key, made.key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert, made.cert.pem().as_bytes(), 0o644)?;
    Ok((cert, key))
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_self_signed_certificate_is_made_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::self_signed(dir.path(), &["strata.test".into()]).unwrap();
        let first = std::fs::read(&cert).unwrap();
        super::server_config(&cert, &key).unwrap();
        super::self_signed(dir.path(), &[]).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), first, "the certificate was made again");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        // A key that does not go with the certificate is refused.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = super::self_signed(other.path(), &[]).unwrap();
        let err = super::server_config(&cert, &other_key).unwrap_err();
        assert!(err.contains("do not go together"), "{err}");
        assert!(super::server_config(&key, &key).unwrap_err().contains("no PEM certificate"));
    }
}

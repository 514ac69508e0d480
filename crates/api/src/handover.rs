//! The server's local socket (`STATE/serve.sock`, its owner's only): this
//! machine's CLI asks it for a session waiting in a pool, which the server
//! hands over detached for the CLI to attach, so `strata run` starts from
//! the same warm pool as the API. One JSON line asked, one answered, per
//! connection; anything unexpected is answered "none", and the CLI
//! launches as it would without a server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_engine::context::ContextSettings;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::AppState;

/// The socket's name in the state directory.
pub const SOCKET: &str = "serve.sock";
/// The longest question read.
const MAX_LINE: u64 = 64 << 10;

#[derive(Serialize, Deserialize)]
struct Take {
    package: String,
    settings: ContextSettings,
}

#[derive(Serialize, Deserialize, Default)]
struct Taken {
    /// The session handed over, detached; none waited (or it failed).
    id: Option<String>,
    /// Why none was handed over, when something failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The socket of the server of the store at `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Listens on the store's socket until the server stops; a previous
/// server's socket is replaced (a server with pools binds it). Returns
/// once it is bound.
///
/// # Errors
/// If the socket cannot be bound.
pub fn listen(st: Arc<AppState>) -> std::io::Result<Listening> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(&st.engine.cfg.state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path)?);
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    tokio::spawn(answer(st.clone(), conn));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the local socket stopped accepting");
                    return;
                }
            }
        }
    });
    Ok(Listening { path, inode, task })
}

/// The bound socket; removed (if still this server's) when dropped.
pub struct Listening {
    path: PathBuf,
    inode: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn answer(st: Arc<AppState>, conn: tokio::net::UnixStream) {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    let taken = match BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<Take>(&line) {
            Ok(rq) => take(&st, rq).await,
            Err(e) => Taken { id: None, error: Some(format!("a malformed question: {e}")) },
        },
        Err(e) => Taken { id: None, error: Some(e.to_string()) },
    };
    let mut out = serde_json::to_vec(&taken).expect("serializes");
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

async fn take(st: &Arc<AppState>, rq: Take) -> Taken {
    if !st.pool_targets.contains_key(&rq.package) || rq.settings.validate().is_err() {
        return Taken::default();
    }
    let taken = st.pool.take(&rq.package, &rq.settings).await;
    st.refill(&rq.package);
    match taken {
        Ok(Some(s)) => match s.detach().await {
            Ok(id) => {
                tracing::info!(session = %id, package = %rq.package, "handed a pooled session to this machine's CLI");
                Taken { id: Some(id), error: None }
            }
            Err(e) => Taken { id: None, error: Some(e.to_string()) },
        },
        Ok(None) => Taken::default(),
        Err(e) => Taken { id: None, error: Some(e.to_string()) },
    }
}

/// Asks the server of the store at `state_dir`, if one runs, for a session
/// of `package`'s pool with `settings` applied; its id, handed over
/// detached. `None` when no server runs, none waits, or anything fails
/// (logged): the caller launches as it would have.
pub async fn take_pooled(state_dir: &Path, package: &str, settings: &ContextSettings) -> Option<String> {
    let asked = async {
        let mut conn = tokio::net::UnixStream::connect(socket_path(state_dir)).await.ok()?;
        let mut q = serde_json::to_vec(&Take { package: package.into(), settings: settings.clone() }).ok()?;
        q.push(b'\n');
        conn.write_all(&q).await.ok()?;
        let mut line = String::new();
        BufReader::new(conn.take(MAX_LINE)).read_line(&mut line).await.ok()?;
        serde_json::from_str::<Taken>(&line).ok()
    };
    // A server that does not answer soon is not waited for.
    let taken = tokio::time::timeout(std::time::Duration::from_secs(10), asked).await.ok().flatten()?;
    if let Some(e) = &taken.error {
        tracing::warn!(error = %e, "the server could not hand over a pooled session; launching");
    }
    taken.id
}

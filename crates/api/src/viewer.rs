//! A viewer of one graphical session for this machine's CLI: the web page's
//! viewer, served on loopback with a token made for this run, the display
//! relayed from QEMU's VNC socket. It serves nothing else: no API, no other
//! session. It lives as long as the [`Viewer`] the CLI holds.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

struct Shown {
    session: String,
    vnc: PathBuf,
    token: String,
    web_dir: Option<PathBuf>,
}

type St = State<Arc<Shown>>;

/// A running viewer; it stops when dropped.
pub struct Viewer {
    /// The address that shows the session (its token in the fragment, which
    /// a browser never sends anywhere).
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Deserialize)]
struct DisplayQuery {
    token: Option<String>,
}

/// Serves a viewer of session `session` of `package`, whose display is
/// QEMU's VNC socket `vnc`, on a free loopback port.
///
/// # Errors
/// If no port can be bound or no token made.
pub async fn serve(session: &str, package: &str, vnc: PathBuf, web_dir: Option<PathBuf>) -> std::io::Result<Viewer> {
    let token = crate::auth::new_token().map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shown = Arc::new(Shown { session: session.to_string(), vnc, token: token.clone(), web_dir });
    let app = Router::new()
        .route("/", get(crate::web::index))
        .route("/app.js", get(crate::web::app))
        .route("/style.css", get(crate::web::style))
        .route("/vendor/novnc/{*path}", get(novnc))
        .route("/vendor/{name}", get(vendor))
        .route("/v1/sessions/{id}/display", get(display))
        .with_state(shown);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the local viewer stopped");
        }
    });
    let url = format!("http://{addr}/#session={session}&attach={token}&package={package}");
    Ok(Viewer { url, task })
}

async fn vendor(State(s): St, Path(name): Path<String>) -> Result<Response, ApiError> {
    crate::web::vendor_file(s.web_dir.as_deref(), &name).await
}

async fn novnc(State(s): St, Path(path): Path<String>) -> Result<Response, ApiError> {
    crate::web::novnc_file(s.web_dir.as_deref(), &path).await
}

async fn display(
    State(s): St,
    Path(id): Path<String>,
    Query(q): Query<DisplayQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let given = q.token.unwrap_or_default();
    let valid: bool = given.as_bytes().ct_eq(s.token.as_bytes()).into();
    if !valid || id != s.session {
        return Err(ApiError::unauthorized());
    }
    let stream = tokio::net::UnixStream::connect(&s.vnc)
        .await
        .map_err(|e| ApiError::conflict(format!("the display of session {id} is not available: {e}")))?;
    Ok(ws.on_upgrade(move |socket| crate::routes::relay_display(socket, stream)).into_response())
}

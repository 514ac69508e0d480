//! The web page: our own files are built into the binary; xterm.js comes
//! from the npm packages the setup installs under `web/node_modules`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

const INDEX: &str = include_str!("../../../web/index.html");
const APP: &str = include_str!("../../../web/app.js");
const STYLE: &str = include_str!("../../../web/style.css");

pub async fn index() -> Response {
    ([(CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
}

pub async fn app() -> Response {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], APP).into_response()
}

pub async fn style() -> Response {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

/// The front-end libraries the page loads, by the name the page uses.
const VENDOR: &[(&str, &str, &str)] = &[
    ("xterm.mjs", "@xterm/xterm/lib/xterm.mjs", "text/javascript; charset=utf-8"),
    ("xterm.css", "@xterm/xterm/css/xterm.css", "text/css; charset=utf-8"),
    ("addon-fit.mjs", "@xterm/addon-fit/lib/addon-fit.mjs", "text/javascript; charset=utf-8"),
];

pub async fn vendor(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    vendor_file(st.web_dir.as_deref(), &name).await
}

/// The `web/` directory whose `node_modules` the setup filled (`npm ci`).
fn libraries(web_dir: Option<&std::path::Path>) -> Result<&std::path::Path, ApiError> {
    web_dir.ok_or_else(|| {
        ApiError::not_found("the web page's libraries are not installed; setup.sh installs them (npm ci in web/)")
    })
}

/// A front-end library's file from `web_dir`'s npm packages.
pub(crate) async fn vendor_file(web_dir: Option<&std::path::Path>, name: &str) -> Result<Response, ApiError> {
    let (_, rel, mime) =
        VENDOR.iter().find(|(n, _, _)| *n == name).ok_or_else(|| ApiError::not_found(format!("no file {name}")))?;
    let dir = libraries(web_dir)?;
    let path = dir.join("node_modules").join(rel);
    let body = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::not_found(format!("{}: {e}; run `npm ci` in web/ (setup.sh does)", path.display())))?;
    Ok(([(CONTENT_TYPE, *mime)], body).into_response())
}

/// noVNC's modules (the display viewer), from its npm package: only
/// JavaScript files under `core/` and `vendor/`, by plain relative paths.
pub async fn novnc(State(st): State<Arc<AppState>>, Path(path): Path<String>) -> Result<Response, ApiError> {
    novnc_file(st.web_dir.as_deref(), &path).await
}

pub(crate) async fn novnc_file(web_dir: Option<&std::path::Path>, path: &str) -> Result<Response, ApiError> {
    let plain = path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && path.chars().all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c));
    if !plain || !(path.starts_with("core/") || path.starts_with("vendor/")) || !path.ends_with(".js") {
        return Err(ApiError::not_found(format!("no file {path}")));
    }
    let dir = libraries(web_dir)?;
    let file = dir.join("node_modules/@novnc/novnc").join(path);
    let body = tokio::fs::read(&file).await.map_err(|e| ApiError::not_found(format!("{}: {e}", file.display())))?;
    Ok(([(CONTENT_TYPE, "text/javascript; charset=utf-8")], body).into_response())
}

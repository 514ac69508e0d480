//! E2B's API through a control plane: point an E2B SDK at the plane
//! (`E2B_API_URL` and `E2B_SANDBOX_URL` at `http://PLANE/e2b`, a terminal's
//! token as `E2B_API_KEY`) and its sandboxes are placed on the cluster's
//! servers like any launch. Each server answers E2B's API itself
//! (strata-api's e2b.rs); the plane picks the server and passes requests
//! on as they come, streams included:
//!
//! - creating a sandbox is placed (its template's package decides the
//!   memory), then recorded in etcd at once, as a launch is;
//! - a request about one sandbox (`/sandboxes/{id}/...`) goes to its
//!   server, in its owner's name (the cluster's secret, as the plane's
//!   orders go); another terminal's sandbox is not found;
//! - the sandbox's data plane (commands, files: requests naming it in
//!   `E2b-Sandbox-Id`) goes to its server unchanged, which checks its
//!   access token;
//! - listings (sandboxes, snapshots) are gathered from every server and
//!   paged here; a snapshot is deleted wherever it is.
//!
//! Signed file URLs carry no sandbox id: each server is asked whether one
//! of its sandboxes signs the URL, and the request goes there.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use strata_cluster::{ServerLoad, SessionEntry};

use crate::{passed_on, unavailable, unavailable_session, ApiError, ControlPlane};

type St = State<Arc<ControlPlane>>;

/// The largest body of a create request read here (it is JSON).
const CREATE_BODY_MAX: usize = 64 << 10;
/// How many items a listing gathers from each server.
const GATHER_LIMIT: usize = 1000;

/// An error as E2B's SDKs read it: `{"code": STATUS, "message": "..."}`.
fn e2b_error(e: ApiError) -> Response {
    (e.status, Json(json!({ "code": e.status.as_u16(), "message": e.message }))).into_response()
}

/// Every request under `/e2b/`.
pub(crate) async fn forward(State(cp): St, req: Request) -> Response {
    route(&cp, req).await.unwrap_or_else(e2b_error)
}

/// A session not found, said as E2B says it (etcd's failures as they are).
fn sandbox_error(e: ApiError, id: &str) -> ApiError {
    if e.status == StatusCode::NOT_FOUND {
        ApiError::not_found(format!("sandbox {id:?} not found"))
    } else {
        e
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

async fn route(cp: &ControlPlane, req: Request) -> Result<Response, ApiError> {
    // Signed file URLs come to `/files` at the root (the SDK makes them so).
    let path = req.uri().path();
    let path = path.strip_prefix("/e2b").unwrap_or(path).to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The data plane: its server checks the sandbox's access token.
    if let Some(id) = header(req.headers(), "e2b-sandbox-id").map(str::to_string) {
        let (entry, server) = cp.find_session(&id, |_| true).await.map_err(|e| sandbox_error(e, &id))?;
        let server = server.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
        return proxy(cp, &server, req, None).await;
    }
    if segments == ["files"] {
        return signed_file(cp, req).await;
    }
    let key = header(req.headers(), "x-api-key")
        .or_else(|| header(req.headers(), "authorization").and_then(|a| a.strip_prefix("Bearer ")))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an API key is required: set E2B_API_KEY to a strata API token (`strata token create TERMINAL --etcd ...`)",
            )
        })?
        .to_string();
    let terminal = cp.terminal_of(&key).await?;
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::POST, ["sandboxes"] | ["v2", "sandboxes"]) => create(cp, &terminal, req).await,
        (&Method::GET, ["sandboxes"] | ["snapshots"]) => gather(cp, &terminal, &path, req, false).await,
        (&Method::GET, ["v2", "sandboxes"]) => gather(cp, &terminal, &path, req, true).await,
        (_, ["sandboxes", id, ..] | ["v2", "sandboxes", id, ..]) => {
            let id = id.to_string();
            let (entry, server) = cp.managed(&terminal, &id).await.map_err(|e| sandbox_error(e, &id))?;
            let server = server.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
            let killed = method == Method::DELETE && segments.len() == 2;
            let resp = proxy(cp, &server, req, Some(&entry.owner)).await?;
            // Unlisted at once, as `kill` through the plane does.
            if killed && resp.status().is_success() {
                if let Err(e) = cp.cluster.remove_session(&id).await {
                    tracing::warn!(session = %id, error = %e, "could not forget the killed sandbox yet; its server will");
                }
            }
            Ok(resp)
        }
        (&Method::DELETE, ["templates", _]) => delete_everywhere(cp, &terminal, &path).await,
        _ => Err(ApiError::not_found(format!("{method} /e2b{path} is not part of E2B's API"))),
    }
}

/// A signed file URL (the SDK's upload and download URLs): it names no
/// sandbox, so each server is asked whether one of its sandboxes signs it
/// (`/e2b/files/holder`), and the request goes to the one that does.
async fn signed_file(cp: &ControlPlane, req: Request) -> Result<Response, ApiError> {
    let query = req.uri().query().unwrap_or_default().to_string();
    if !query.split('&').any(|p| p.starts_with("signature=")) {
        return Err(ApiError::bad_request(
            "a /files request names its sandbox in E2b-Sandbox-Id, or is a signed URL (with `signature`)",
        ));
    }
    let operation = if req.method() == Method::GET { "read" } else { "write" };
    for server in cp.cluster.servers().await.map_err(unavailable)? {
        let asked = cp
            .http
            .get(format!("{}/e2b/files/holder?{query}&operation={operation}", server.address))
            .bearer_auth(&cp.secret)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await;
        if asked.is_ok_and(|r| r.status() == StatusCode::NO_CONTENT) {
            return proxy(cp, &server, req, None).await;
        }
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "this file URL's signature matches no sandbox of the cluster (or it has expired)",
    ))
}

/// Passes `req` on to `server` as it comes and its answer back as it
/// comes. In `owner`'s name (the cluster's secret) for the API; as it is
/// for the data plane (`None`), whose access token the server checks.
async fn proxy(
    cp: &ControlPlane,
    server: &ServerLoad,
    req: Request,
    owner: Option<&str>,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let url = format!("{}{}{query}", server.address, parts.uri.path());
    let mut out = cp.http.request(parts.method.clone(), url);
    for (name, value) in &parts.headers {
        // The data plane's `Authorization` (Basic: the command's user) goes
        // on; the API's is the plane's own.
        let skipped = ["host", "content-length", "connection", "transfer-encoding", "x-api-key"];
        let replaced = owner.is_some() && name == "authorization";
        if !skipped.contains(&name.as_str()) && !replaced {
            out = out.header(name, value);
        }
    }
    if let Some(owner) = owner {
        out = out.bearer_auth(&cp.secret).header(strata_api::cluster::TERMINAL_HEADER, owner);
    }
    let resp = out
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await
        .map_err(|e| crate::unreachable(server, &e))?;
    let mut answer = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !["connection", "transfer-encoding", "content-length"].contains(&name.as_str()) {
            answer = answer.header(name, value);
        }
    }
    answer
        .body(axum::body::Body::from_stream(resp.bytes_stream()))
        .map_err(|e| ApiError::internal(format!("passing an answer on: {e}")))
}

/// Creates a sandbox where placement puts it (trying another server if one
/// fails midway), and lists it at once.
async fn create(cp: &ControlPlane, terminal: &str, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, CREATE_BODY_MAX)
        .await
        .map_err(|e| ApiError::bad_request(format!("the sandbox request is not readable: {e}")))?;
    let asked: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the sandbox request is not JSON: {e}")))?;
    let template = match asked["templateID"].as_str() {
        None | Some("base") => strata_api::e2b::BASE_TEMPLATE,
        Some(t) => t,
    };
    let entries = cp.cluster.sessions().await.map_err(unavailable)?;
    crate::room_in_cluster(cp, &entries, terminal, 1)?;
    let request = match cp.request_for(template) {
        Ok(r) => {
            crate::memory_room(cp, &entries, terminal, template, 1)?;
            r
        }
        // A template that is no package (a snapshot's name) is placed as a
        // package of the default size.
        Err(_) => crate::Request { memory_mib: 512, images: vec![format!("package/{template}")] },
    };
    let path = parts.uri.path();
    let (server, status, created) = crate::order_placed(cp, terminal, &request, template, path, &asked).await?;
    if let Some(id) = created["sandboxID"].as_str() {
        let package = created["alias"].as_str().unwrap_or(template);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let entry = SessionEntry::running(id, &server.id, package, terminal, now);
        // Its server records it too, within seconds; the SDK's next call
        // (to its data plane) needs it now.
        if let Err(e) = cp.cluster.put_session(&entry).await {
            tracing::warn!(session = %id, error = %e, "could not record the sandbox yet; its server will");
        }
    }
    Ok((status, Json(created)).into_response())
}

/// A listing gathered from every server (each asked for all it has, with
/// the caller's filters), then paged here if `paged`: `limit` items from the
/// offset in `nextToken`, the next page's token in `x-next-token`.
async fn gather(
    cp: &ControlPlane,
    terminal: &str,
    path: &str,
    req: Request,
    paged: bool,
) -> Result<Response, ApiError> {
    let mut query: Vec<(String, String)> =
        req.uri().query().map(|q| serde_urlencoded::from_str(q).unwrap_or_default()).unwrap_or_default();
    let take = |query: &mut Vec<(String, String)>, key: &str| {
        query.iter().position(|(k, _)| k == key).map(|i| query.remove(i).1)
    };
    let limit = match take(&mut query, "limit") {
        Some(l) => l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("limit {l:?} is not a number")))?,
        None => 100,
    }
    .clamp(1, 1000);
    let from = match take(&mut query, "nextToken").filter(|t| !t.is_empty()) {
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("nextToken {t:?} is not one this plane gave")))?,
        None => 0,
    };
    query.push(("limit".into(), GATHER_LIMIT.to_string()));
    let query = serde_urlencoded::to_string(&query).unwrap_or_default();
    let mut all = Vec::new();
    for server in cp.cluster.servers().await.map_err(unavailable)? {
        let url = format!("{}/e2b{path}?{query}", server.address);
        let resp = cp
            .http
            .get(url)
            .bearer_auth(&cp.secret)
            .header(strata_api::cluster::TERMINAL_HEADER, terminal)
            .timeout(crate::ORDER_TIMEOUT)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                if let Ok(Value::Array(items)) = r.json::<Value>().await {
                    all.extend(items);
                }
            }
            Ok(r) => {
                let status = r.status();
                return Err(passed_on(status, r.json().await.unwrap_or(Value::Null)));
            }
            // A server that does not answer lists nothing now.
            Err(e) => tracing::warn!(server = %server.id, error = %e, "a server did not answer a listing"),
        }
    }
    if !paged && path != "/snapshots" {
        return Ok(Json(all).into_response());
    }
    let (items, next) = page(all, from, limit);
    let mut resp = Json(items).into_response();
    if let Some(v) = next.and_then(|n| n.to_string().parse().ok()) {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// `limit` items of `all` from offset `from`, and the next page's offset if
/// any are left after them.
fn page(all: Vec<Value>, from: usize, limit: usize) -> (Vec<Value>, Option<usize>) {
    let more = all.len() > from + limit;
    let items = all.into_iter().skip(from).take(limit).collect();
    (items, more.then_some(from + limit))
}

/// Deletes one of the caller's snapshots on whichever servers hold it: 204
/// if one did, else 404.
async fn delete_everywhere(cp: &ControlPlane, terminal: &str, path: &str) -> Result<Response, ApiError> {
    let mut deleted = false;
    for server in cp.cluster.servers().await.map_err(unavailable)? {
        let resp = cp
            .http
            .delete(format!("{}/e2b{path}", server.address))
            .bearer_auth(&cp.secret)
            .header(strata_api::cluster::TERMINAL_HEADER, terminal)
            .timeout(crate::ORDER_TIMEOUT)
            .send()
            .await;
        deleted |= resp.is_ok_and(|r| r.status().is_success());
    }
    if deleted {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!(
            "no snapshot {} of yours on any server",
            path.trim_start_matches("/templates/")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gathered_listing_is_paged_by_offset_until_nothing_is_left() {
        let all: Vec<Value> = (0..5).map(|i| json!(i)).collect();
        assert_eq!(page(all.clone(), 0, 2), (vec![json!(0), json!(1)], Some(2)));
        assert_eq!(page(all.clone(), 2, 2), (vec![json!(2), json!(3)], Some(4)));
        assert_eq!(page(all.clone(), 4, 2), (vec![json!(4)], None));
        assert_eq!(page(all.clone(), 3, 2), (vec![json!(3), json!(4)], None), "exactly the rest: no next page");
        assert_eq!(page(all, 9, 2), (vec![], None), "past the end: empty");
    }
}

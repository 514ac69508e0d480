//! Serving a router over TCP, plain or with TLS, for `strata serve` and the
//! control plane.

use std::sync::Arc;

/// Serves `app` on `listener` (made non-blocking by the caller) until it
/// fails; with TLS if `tls` is given. Every connection has `TCP_NODELAY`:
/// a streamed answer's last small frame (E2B's end of a command) would
/// otherwise wait for the client's delayed acknowledgement, ~40 ms.
///
/// # Errors
/// If serving fails.
pub async fn serve(
    listener: std::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    match tls {
        Some(cfg) => {
            let cfg = axum_server::tls_rustls::RustlsConfig::from_config(cfg);
            axum_server::from_tcp_rustls(listener, cfg)
                .map(|tls| tls.acceptor(axum_server::accept::NoDelayAcceptor::new()))
                .serve(app.into_make_service())
                .await?
        }
        None => {
            use axum::serve::ListenerExt as _;
            let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
            });
            axum::serve(listener, app).await?
        }
    }
    Ok(())
}

//! The HTTP surface. This file holds the listener and the operational
//! endpoints (`/healthz`, `/readyz`, `/metrics`); the operator API
//! ([`crate::api`]) is mounted under `/api/v1`, and an external broker's
//! authentication hook ([`crate::mqtt_auth`]) is at `POST /mqtt/auth`.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::server::AppState;

/// The whole router, without a socket (tests drive it directly).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            crate::mqtt_auth::PATH,
            post(crate::mqtt_auth::authenticate)
                .layer(DefaultBodyLimit::max(crate::mqtt_auth::BODY_LIMIT_BYTES)),
        )
        .nest(crate::api::PREFIX, crate::api::router(state.clone()))
        .with_state(state)
}

/// Binds `listen` and serves until `stop` turns true.
pub async fn serve(
    listen: SocketAddr,
    state: AppState,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen for HTTP on {listen}"))?;
    let addr = listener.local_addr()?;
    let app = router(state);
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    Ok((addr, task))
}

/// The process is up.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The store answers.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let probe = crate::store::DeviceQuery { page: crate::store::PageRequest::first(1), ..Default::default() };
    match state.store.list_devices(probe).await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(error) => {
            tracing::warn!(%error, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
    }
}

/// Prometheus text exposition.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let link = state.link_stats.read();
    let body = state
        .metrics
        .render(link.connections, link.lost, link.reconnects);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

//! `/server` (what clients and traps pin) and `/tokens` (operator tokens).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::extract::{JsonBody, PageParams, PathParams, QueryParams, to_hex};
use super::views::PageView;
use crate::server::AppState;
use crate::store::{ApiRole, ApiTokenInfo};

/// Answer of `GET /server`.
#[derive(Debug, Serialize)]
pub struct ServerInfo {
    /// The server's version.
    version: &'static str,
    /// The server's ed25519 identity public key, hex: traps may pin it.
    identity_public_key: String,
    /// Where devices connect: the embedded broker's listeners or the external broker.
    mqtt: MqttListeners,
}

/// Where devices connect, `host:port` per MQTT version (the same address for both
/// with an external broker).
#[derive(Debug, Serialize)]
struct MqttListeners {
    v4: String,
    v5: String,
}

/// `GET /server`.
pub async fn server_info(State(state): State<AppState>) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION"),
        identity_public_key: to_hex(&state.identity_public_key),
        mqtt: MqttListeners { v4: state.mqtt_v4.clone(), v5: state.mqtt_v5.clone() },
    })
}

/// A role as the API names it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RoleName {
    Admin,
    ReadOnly,
}

impl From<RoleName> for ApiRole {
    fn from(role: RoleName) -> Self {
        match role {
            RoleName::Admin => ApiRole::Admin,
            RoleName::ReadOnly => ApiRole::ReadOnly,
        }
    }
}

/// Body of `POST /tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTokenBody {
    role: RoleName,
    label: Option<String>,
}

/// Answer of `POST /tokens`: the bearer token, shown this once.
#[derive(Debug, Serialize)]
pub struct CreatedToken {
    token: String,
    info: ApiTokenInfo,
}

/// `POST /tokens`.
pub async fn create_token(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewTokenBody>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let label = body.label.unwrap_or_default();
    let created = state
        .store
        .create_api_token(body.role.into(), label)
        .await?;
    tracing::info!(token_id = created.info.id, role = ?created.info.role, "API token created");
    Ok((StatusCode::CREATED, Json(CreatedToken { token: created.token, info: created.info })))
}

/// `GET /tokens`: ordered by id, revoked ones included.
pub async fn list_tokens(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<PageView<ApiTokenInfo>>, ApiError> {
    let page = state.store.list_api_tokens(params.request()?).await?;
    Ok(Json(PageView::map(page, |token| token)))
}

/// `POST /tokens/{id}/revoke`: 204; the token is refused from now on.
pub async fn revoke_token(
    State(state): State<AppState>,
    PathParams(id): PathParams<i64>,
) -> Result<StatusCode, ApiError> {
    state.store.revoke_api_token(id).await?;
    tracing::info!(token_id = id, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

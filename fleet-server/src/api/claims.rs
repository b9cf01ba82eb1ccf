//! `/claim-tokens` and `/allowlist`: what lets a new trap claim itself.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ApiError;
use super::extract::{JsonBody, PageParams, PathParams, QueryParams, key_from_hex, parse_key_hex};
use super::views::{AllowedIdentityView, PageView};
use crate::server::AppState;
use crate::store::{ClaimTokenInfo, generate_claim_token};

/// Lifetime of a claim token when the request names none: 7 days.
pub const CLAIM_TOKEN_LIFETIME_DEFAULT_S: u32 = 7 * 86_400;
/// Longest lifetime of a claim token: 365 days.
pub const CLAIM_TOKEN_LIFETIME_MAX_S: u32 = 365 * 86_400;

/// Body of `POST /claim-tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClaimTokenBody {
    uses: Option<u32>,
    expires_in_s: Option<u32>,
    label: Option<String>,
}

/// Answer of `POST /claim-tokens`: the token text, shown this once.
#[derive(Debug, Serialize)]
pub struct CreatedClaimToken {
    token: String,
    claim_token: ClaimTokenInfo,
}

/// `POST /claim-tokens`: a new token for `uses` claims within `expires_in_s`.
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewClaimTokenBody>,
) -> Result<(StatusCode, Json<CreatedClaimToken>), ApiError> {
    let lifetime_s = body.expires_in_s.unwrap_or(CLAIM_TOKEN_LIFETIME_DEFAULT_S);
    if !(1..=CLAIM_TOKEN_LIFETIME_MAX_S).contains(&lifetime_s) {
        return Err(ApiError::unprocessable(
            "invalid_value",
            format!("expires_in_s must be within 1..={CLAIM_TOKEN_LIFETIME_MAX_S}"),
        ));
    }
    let expires_at_ms = state.clock.now_ms() + i64::from(lifetime_s) * 1_000;
    let generated =
        generate_claim_token(body.uses.unwrap_or(1), expires_at_ms, body.label.unwrap_or_default())?;
    let claim_token = state.store.create_claim_token(generated.record).await?;
    tracing::info!(claim_id = %claim_token.id, uses = claim_token.uses_max, "claim token created");
    Ok((StatusCode::CREATED, Json(CreatedClaimToken { token: generated.token, claim_token })))
}

/// `GET /claim-tokens`: ordered by id, revoked and used-up ones included.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<PageView<ClaimTokenInfo>>, ApiError> {
    let page = state.store.list_claim_tokens(params.request()?).await?;
    Ok(Json(PageView::map(page, |token| token)))
}

/// `POST /claim-tokens/{id}/revoke`: later claims with it fail.
pub async fn revoke(
    State(state): State<AppState>,
    PathParams(id): PathParams<String>,
) -> Result<Json<ClaimTokenInfo>, ApiError> {
    state.store.revoke_claim_token(id.clone()).await?;
    let token = state.store.get_claim_token(id.clone()).await?;
    token
        .map(Json)
        .ok_or_else(|| ApiError::not_found("claim_token_not_found", format!("claim token {id} not found")))
}

/// Body of `POST /allowlist`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowBody {
    identity_key: String,
    note: Option<String>,
}

/// `POST /allowlist`: lets this identity key claim without a token.
pub async fn allow(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<AllowBody>,
) -> Result<(StatusCode, Json<AllowedIdentityView>), ApiError> {
    let key = key_from_hex("identity_key", &body.identity_key)?;
    let entry = state
        .store
        .allow_identity(key, body.note.unwrap_or_default())
        .await?;
    Ok((StatusCode::CREATED, Json(entry.into())))
}

/// `GET /allowlist`: ordered by key.
pub async fn list_allowed(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<PageView<AllowedIdentityView>>, ApiError> {
    let page = state
        .store
        .list_allowed_identities(params.request()?)
        .await?;
    Ok(Json(PageView::map(page, AllowedIdentityView::from)))
}

/// `DELETE /allowlist/{identity_key}`: 204, or 404 if it was not listed.
pub async fn disallow(
    State(state): State<AppState>,
    PathParams(text): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    let key = parse_key_hex(&text)
        .ok_or_else(|| ApiError::bad_request("invalid_path", "identity_key must be 64 hex digits"))?;
    if state.store.disallow_identity(key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("identity_not_found", "identity key is not on the allow-list"))
    }
}

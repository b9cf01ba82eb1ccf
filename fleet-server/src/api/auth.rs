//! Operator authentication: `Authorization: Bearer <token>`, looked up by
//! its hash on every request (a read on a pooled connection; a revocation
//! takes effect at once), and the role each route needs.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;

use super::ApiError;
use crate::server::AppState;
use crate::store::{ApiRole, TokenHash};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (the OpenAPI document).
    Public,
    /// Any valid token (`read_only` or `admin`).
    Read,
    /// An `admin` token.
    Admin,
}

impl Access {
    /// The role a token needs, or `None` for public routes.
    pub fn required_role(self) -> Option<ApiRole> {
        match self {
            Access::Public => None,
            Access::Read => Some(ApiRole::ReadOnly),
            Access::Admin => Some(ApiRole::Admin),
        }
    }
}

/// Middleware state: the server and the role the route needs.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Where tokens are looked up.
    pub state: AppState,
    /// What the route needs.
    pub required: ApiRole,
}

/// Lets the request through if its token grants `gate.required`.
pub async fn authorize(State(gate): State<Gate>, request: Request, next: Next) -> Result<Response, ApiError> {
    let token = bearer_token(request.headers())?;
    let info = gate
        .state
        .store
        .api_token_by_hash(TokenHash::of(token))
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown API token"))?;
    if info.revoked_at_ms.is_some() {
        return Err(ApiError::unauthorized("API token was revoked"));
    }
    if !info.role.allows(gate.required) {
        return Err(ApiError::forbidden("this token's role does not allow this request (admin needed)"));
    }
    if request.method() != Method::GET {
        tracing::info!(token_id = info.id, method = %request.method(), path = %request.uri().path(), "operator write");
    }
    Ok(next.run(request).await)
}

/// The token of an `Authorization: Bearer ...` header.
fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> header"))?;
    let text = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization header is not text"))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be: Bearer <token>"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::unauthorized("Authorization header must be: Bearer <token>"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token(&headers("Bearer wcat_x")).unwrap(), "wcat_x");
        assert_eq!(bearer_token(&headers("bearer  wcat_x ")).unwrap(), "wcat_x");
        assert!(bearer_token(&headers("Basic abc")).is_err());
        assert!(bearer_token(&headers("Bearer ")).is_err());
        assert!(bearer_token(&HeaderMap::new()).is_err());
    }
}

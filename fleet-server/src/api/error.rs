//! The one error type of the operator API: a status, a stable machine code
//! and a message for people, rendered as
//! `{"error": {"code": "...", "message": "..."}}`.
//!
//! Internal failures (database, workers, corrupt rows) reach the client as a
//! bare `500 internal` and are logged in full here; nothing of the storage
//! layer leaks into a response.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

/// An API failure: what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`snake_case`).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

/// The JSON body of every error response.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// 400: a malformed parameter or body.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no usable credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the token's role does not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404: the named resource does not exist.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409: the request conflicts with the resource's state.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 422: well-formed, but a value is out of its allowed range.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 500: logged in full, reported as `internal` only.
    pub fn internal(detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error")
    }

    /// 404 for a path no route serves.
    pub fn route_not_found() -> Self {
        Self::not_found("route_not_found", "no such API route")
    }

    /// 405 for a path served, but not with this method.
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: &self.message } };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        use StoreError as E;
        let message = error.to_string();
        match error {
            E::LimitOutOfRange { .. } => Self::bad_request("invalid_limit", message),
            E::InvalidCursor => Self::bad_request("invalid_cursor", message),
            E::InvalidInput(_) => Self::unprocessable("invalid_value", message),
            E::DeviceNotFound(_) => Self::not_found("device_not_found", message),
            E::ClaimTokenNotFound(_) => Self::not_found("claim_token_not_found", message),
            E::ApiTokenNotFound(_) => Self::not_found("api_token_not_found", message),
            E::CommandNotFound { .. } => Self::not_found("command_not_found", message),
            E::FirmwareNotFound(_) => Self::not_found("firmware_not_found", message),
            E::RolloutNotFound(_) => Self::not_found("rollout_not_found", message),
            E::FirmwareConflict(_) => Self::conflict("firmware_conflict", message),
            E::RolloutState { .. } => Self::conflict("rollout_state", message),
            E::DeviceRevoked(_) => Self::conflict("device_revoked", message),
            E::TooManyOpenCommands { .. } => Self::conflict("too_many_open_commands", message),
            E::DeviceIdTaken(_)
            | E::IdentityAlreadyClaimed { .. }
            | E::IdentityRevoked { .. }
            | E::ClaimTokenExists(_) => Self::conflict("already_exists", message),
            E::ClaimTokenExpired(_)
            | E::ClaimTokenExhausted(_)
            | E::ClaimTokenRevoked(_)
            | E::NotOnAllowList => Self::conflict("claim_refused", message),
            E::Closed => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the server is shutting down")
            }
            E::DataDir { .. }
            | E::Database(_)
            | E::SchemaTooNew { .. }
            | E::Setting { .. }
            | E::Corrupt(_)
            | E::WorkerFailed
            | E::Poisoned
            | E::Thread(_)
            | E::Random(_)
            | E::BatchTooLarge { .. }
            | E::CommandIdsExhausted
            | E::OtaIdsExhausted
            | E::ReservationConflict { .. } => Self::internal(&message),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
            }
            _ => Self::bad_request("invalid_body", message),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("invalid_query", rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request("invalid_path", rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_client_statuses_and_hide_internals() {
        let not_found = ApiError::from(StoreError::ClaimTokenNotFound("x".into()));
        assert_eq!((not_found.status, not_found.code), (StatusCode::NOT_FOUND, "claim_token_not_found"));
        let internal = ApiError::from(StoreError::Corrupt("row 7 is garbage".into()));
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!internal.message.contains("row 7"));
        let invalid = ApiError::from(StoreError::InvalidInput("tag too long".into()));
        assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ApiError::from(StoreError::InvalidCursor).status, StatusCode::BAD_REQUEST);
    }
}

//! Extractors that turn every rejection into an [`ApiError`], and the
//! parsing of the parameters routes share (pagination, device ids, hex keys).

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use wildcam_sdk::DeviceId;

use super::ApiError;
use crate::store::{Cursor, PAGE_LIMIT_MAX, PageRequest};

/// Items per page when the client gives no `limit`.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;

/// A JSON request body; a malformed one is a 400, an oversized one a 413.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// Query parameters; unknown or malformed ones are a 400.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Path parameters; malformed ones are a 400.
#[derive(Debug)]
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Query of the paginated lists without filters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

impl PageParams {
    /// The page asked for.
    pub fn request(self) -> Result<PageRequest, ApiError> {
        page_request(self.limit, self.cursor)
    }
}

/// The `{id}` of a `/devices/{id}/...` route, checked to be a valid device id.
#[derive(Debug)]
pub struct DevicePath(pub DeviceId);

impl<S: Send + Sync> FromRequestParts<S> for DevicePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let PathParams(text) = PathParams::<String>::from_request_parts(parts, state).await?;
        parse_device_id(&text).map(Self)
    }
}

/// Parses a device id given by a client.
pub fn parse_device_id(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(text).map_err(|error| {
        ApiError::bad_request("invalid_device_id", format!("invalid device id {text:?}: {error}"))
    })
}

/// The page a client asked for with `limit` (default [`DEFAULT_PAGE_LIMIT`],
/// at most [`PAGE_LIMIT_MAX`]) and `cursor`.
pub fn page_request(limit: Option<u32>, cursor: Option<String>) -> Result<PageRequest, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if !(1..=PAGE_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be within 1..={PAGE_LIMIT_MAX}"),
        ));
    }
    Ok(PageRequest { limit, cursor: cursor.map(Cursor::new) })
}

/// Unix seconds from a query parameter as store milliseconds.
pub fn seconds_to_ms(seconds: u32) -> i64 {
    i64::from(seconds) * 1_000
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// A 32-byte key from 64 hex digits (either case).
pub fn parse_key_hex(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = u8::try_from(high * 16 + low).ok()?;
    }
    Some(key)
}

/// [`parse_key_hex`], or a 422 naming the field.
pub fn key_from_hex(field: &str, text: &str) -> Result<[u8; 32], ApiError> {
    parse_key_hex(text)
        .ok_or_else(|| ApiError::unprocessable("invalid_value", format!("{field} must be 64 hex digits")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 9) as u8);
        let text = to_hex(&key);
        assert_eq!(text.len(), 64);
        assert_eq!(parse_key_hex(&text), Some(key));
        assert_eq!(parse_key_hex(&text.to_uppercase()), Some(key));
        assert_eq!(parse_key_hex(&text[..62]), None);
        assert_eq!(parse_key_hex(&format!("zz{}", &text[2..])), None);
    }

    #[test]
    fn page_limits_are_checked() {
        assert_eq!(page_request(None, None).unwrap().limit, DEFAULT_PAGE_LIMIT);
        assert!(page_request(Some(0), None).is_err());
        assert!(page_request(Some(PAGE_LIMIT_MAX + 1), None).is_err());
        assert_eq!(page_request(Some(5), Some("c".into())).unwrap().cursor, Some(Cursor::new("c")));
    }
}

//! A small client of the fleet server's operator API (`/api/v1`, plain
//! HTTP/1.1, one connection per request): claim tokens for provisioning,
//! the server's identity, and stored detections for the final check.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Longest a request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Path prefix of the API.
const PREFIX: &str = "/api/v1";
/// Items per page when reading detections (the API's maximum).
pub const PAGE_LIMIT: u32 = 1_000;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No connection, or no answer in time.
    #[error("{what}: {message}")]
    Transport {
        /// The request.
        what: String,
        /// The cause.
        message: String,
    },
    /// The server answered with an error.
    #[error("{what}: {status}: {message}")]
    Status {
        /// The request.
        what: String,
        /// The HTTP status.
        status: StatusCode,
        /// The API's error message.
        message: String,
    },
    /// The answer is not what the API documents.
    #[error("{what}: unexpected answer: {message}")]
    Unexpected {
        /// The request.
        what: String,
        /// What is wrong.
        message: String,
    },
}

/// One stored detection, as much as the final check needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredDetection {
    /// Sequence number.
    pub seq: u32,
    /// Capture time, Unix seconds.
    pub captured_at_s: u32,
    /// The 8-byte image digest.
    pub image_digest: u64,
}

/// The API at `addr` with a bearer token.
#[derive(Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client of the API at `addr` authenticating with `token`.
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Self { addr, token }
    }

    /// The server's identity public key (`GET /server`), hex.
    pub async fn server_identity(&self) -> Result<String, ApiError> {
        let answer = self.call(Method::GET, "/server", None).await?;
        answer["identity_public_key"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::Unexpected {
                what: "GET /server".into(),
                message: "no identity_public_key".into(),
            })
    }

    /// A new claim token for `uses` claims (`POST /claim-tokens`, admin).
    pub async fn create_claim_token(
        &self,
        uses: u32,
        expires_in_s: u32,
        label: &str,
    ) -> Result<String, ApiError> {
        let body = json!({ "uses": uses, "expires_in_s": expires_in_s, "label": label });
        let answer = self.call(Method::POST, "/claim-tokens", Some(body)).await?;
        answer["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::Unexpected {
                what: "POST /claim-tokens".into(),
                message: "no token".into(),
            })
    }

    /// One page of `device`'s detections (`GET /detections`), and the cursor
    /// of the next page.
    pub async fn detections_page(
        &self,
        device: &str,
        cursor: Option<&str>,
    ) -> Result<(Vec<StoredDetection>, Option<String>), ApiError> {
        let mut target = format!("/detections?device={device}&limit={PAGE_LIMIT}");
        if let Some(cursor) = cursor {
            target.push_str("&cursor=");
            target.push_str(&percent_encode(cursor));
        }
        let answer = self.call(Method::GET, &target, None).await?;
        let unexpected =
            |message: &str| ApiError::Unexpected { what: format!("GET {target}"), message: message.into() };
        let items = answer["items"]
            .as_array()
            .ok_or_else(|| unexpected("no items"))?;
        let mut page = Vec::with_capacity(items.len());
        for item in items {
            let number = |key: &str| item[key].as_u64().and_then(|n| u32::try_from(n).ok());
            let digest = item["image_digest"].as_str().and_then(parse_digest);
            match (number("seq"), number("captured_at_s"), digest) {
                (Some(seq), Some(captured_at_s), Some(image_digest)) => {
                    page.push(StoredDetection { seq, captured_at_s, image_digest })
                }
                _ => return Err(unexpected("a detection without seq, captured_at_s or image_digest")),
            }
        }
        let next = answer["next_cursor"].as_str().map(str::to_owned);
        Ok((page, next))
    }

    async fn call(&self, method: Method, target: &str, body: Option<Value>) -> Result<Value, ApiError> {
        let what = format!("{method} {PREFIX}{target}");
        let exchange = self.exchange(method, target, body);
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ApiError::Transport { what: what.clone(), message: "no answer in time".into() })?
            .map_err(|message| ApiError::Transport { what: what.clone(), message })?;
        let value: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return value.ok_or(ApiError::Unexpected { what, message: "not JSON".into() });
        }
        let message = value
            .as_ref()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(ApiError::Status { what, status, message })
    }

    async fn exchange(
        &self,
        method: Method,
        target: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Bytes), String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("could not connect to {}: {e}", self.addr))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{PREFIX}{target}"))
            .header(header::HOST, self.addr.to_string())
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    }
}

/// 16 hex digits → the digest as a big-endian `u64`.
fn parse_digest(hex: &str) -> Option<u64> {
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// Percent-encodes everything but unreserved characters (cursors are opaque).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_cursors() {
        assert_eq!(parse_digest("0102030405060708"), Some(0x0102_0304_0506_0708));
        assert_eq!(parse_digest("01"), None);
        assert_eq!(percent_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
    }
}

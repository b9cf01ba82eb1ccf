//! A small client of the fleet server's operator API (`/api/v1`, plain
//! HTTP/1.1, one connection per request): claim tokens for provisioning,
//! the server's identity, stored detections for the final check, and the
//! firmware upload and rollout of an OTA rehearsal.

use std::collections::BTreeMap;
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

/// A rollout as the server sees it (`GET /rollouts/{id}`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RolloutView {
    /// `active`, `paused`, `aborted` or `completed`.
    pub state: String,
    /// Why it was paused, if it was.
    pub pause_reason: Option<String>,
    /// Targets by state (`pending`, `offered`, …, `confirmed`, `rolled_back`).
    pub counts: BTreeMap<String, u64>,
    /// Each target's state, by device id.
    #[serde(skip)]
    pub devices: BTreeMap<String, String>,
}

/// Target states the server still moves on from.
pub const TARGET_STATES_OPEN: [&str; 6] =
    ["pending", "offered", "downloading", "verifying", "ready", "pending_confirmation"];

impl RolloutView {
    /// Targets in `state`.
    pub fn count(&self, state: &str) -> u64 {
        self.counts.get(state).copied().unwrap_or(0)
    }

    /// Targets not in a final state.
    pub fn open(&self) -> u64 {
        TARGET_STATES_OPEN.iter().map(|s| self.count(s)).sum()
    }
}

/// Body of a request.
enum Body {
    None,
    Json(Value),
    /// Raw bytes with their content type and one extra header.
    Raw {
        content_type: &'static str,
        header: (&'static str, String),
        bytes: Vec<u8>,
    },
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
        let answer = self.call(Method::GET, "/server", Body::None).await?;
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
        let answer = self
            .call(Method::POST, "/claim-tokens", Body::Json(body))
            .await?;
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
        let answer = self.call(Method::GET, &target, Body::None).await?;
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

    /// Uploads a firmware image with its signed manifest (`POST /firmware`,
    /// admin; the same image again is the same firmware): its id.
    pub async fn upload_firmware(&self, image: Vec<u8>, manifest_base64: String) -> Result<u32, ApiError> {
        let body = Body::Raw {
            content_type: "application/octet-stream",
            header: ("x-wildcam-manifest", manifest_base64),
            bytes: image,
        };
        let answer = self.call(Method::POST, "/firmware", body).await?;
        id_of(&answer["firmware"], "POST /firmware")
    }

    /// Creates a rollout of `firmware_id` to `devices` (`POST /rollouts`, admin): its id.
    pub async fn create_rollout(
        &self,
        firmware_id: u32,
        devices: &[String],
        max_in_flight: u32,
        failure_threshold: u32,
    ) -> Result<u32, ApiError> {
        let body = json!({
            "firmware_id": firmware_id,
            "devices": devices,
            "max_in_flight": max_in_flight,
            "failure_threshold": failure_threshold,
        });
        let answer = self
            .call(Method::POST, "/rollouts", Body::Json(body))
            .await?;
        id_of(&answer, "POST /rollouts")
    }

    /// A rollout's state, counts and targets (`GET /rollouts/{id}`).
    pub async fn rollout(&self, id: u32) -> Result<RolloutView, ApiError> {
        let target = format!("/rollouts/{id}");
        let answer = self.call(Method::GET, &target, Body::None).await?;
        let unexpected =
            |message: &str| ApiError::Unexpected { what: format!("GET {target}"), message: message.into() };
        let state = answer["state"]
            .as_str()
            .ok_or_else(|| unexpected("no state"))?;
        let counts = answer["counts"]
            .as_object()
            .ok_or_else(|| unexpected("no counts"))?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect();
        let devices = answer["devices"]
            .as_array()
            .ok_or_else(|| unexpected("no devices"))?
            .iter()
            .filter_map(|d| Some((d["device_id"].as_str()?.to_owned(), d["state"].as_str()?.to_owned())))
            .collect();
        Ok(RolloutView {
            state: state.to_owned(),
            pause_reason: answer["pause_reason"].as_str().map(str::to_owned),
            counts,
            devices,
        })
    }

    /// A device's registry entry (`GET /devices/{id}`), as JSON.
    pub async fn device(&self, id: &str) -> Result<Value, ApiError> {
        self.call(Method::GET, &format!("/devices/{id}"), Body::None)
            .await
    }

    async fn call(&self, method: Method, target: &str, body: Body) -> Result<Value, ApiError> {
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
        body: Body,
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
        let body = match body {
            Body::None => Vec::new(),
            Body::Json(value) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                value.to_string().into_bytes()
            }
            Body::Raw { content_type, header: (name, value), bytes } => {
                builder = builder
                    .header(header::CONTENT_TYPE, content_type)
                    .header(name, value);
                bytes
            }
        };
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

/// The `id` of an answer's object.
fn id_of(object: &Value, what: &str) -> Result<u32, ApiError> {
    object["id"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| ApiError::Unexpected { what: what.into(), message: "no id".into() })
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

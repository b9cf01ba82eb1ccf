//! A small client of the operator API: plain HTTP/1.1 over one connection per
//! request (hyper), JSON bodies, the API's error shape turned into messages.
//! Plain HTTP only: the API is meant for loopback or a TLS-terminating proxy.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;

/// Longest a request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the API is and how to authenticate.
#[derive(Clone)]
pub struct ApiClient {
    authority: String,
    base_path: String,
    token: Option<String>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("authority", &self.authority)
            .field("base_path", &self.base_path)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client of the server at `server` (`http://host:port`, optionally
    /// with a path prefix in front of `/api/v1`).
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let uri: Uri = server
            .parse()
            .with_context(|| format!("invalid server URL {server:?}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("unsupported scheme {other:?} in {server:?}: only plain http is supported"),
            None => bail!("server URL {server:?} needs a scheme, e.g. http://127.0.0.1:18080"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("server URL {server:?} has no host"))?;
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{}:80", authority.host())
        };
        let base_path = format!("{}{}", uri.path().trim_end_matches('/'), crate::api::PREFIX);
        let token = token.filter(|token| !token.is_empty());
        Ok(Self { authority, base_path, token })
    }

    /// `GET path?query`.
    pub async fn get(&self, path: &str, query: &impl Serialize) -> Result<Value> {
        let query = serde_urlencoded::to_string(query).context("encoding the query")?;
        let target = if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") };
        self.call(Method::GET, &target, None).await
    }

    /// A request with an optional JSON body; `null` for a 204.
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .context("encoding the body")?
            .map(|bytes| Payload { bytes, content_type: "application/json", header: None });
        self.call(method, path, body).await
    }

    /// `POST path` with raw bytes and one extra header (firmware uploads).
    pub async fn post_bytes(
        &self,
        path: &str,
        bytes: Vec<u8>,
        header: (&'static str, String),
    ) -> Result<Value> {
        let payload = Payload { bytes, content_type: "application/octet-stream", header: Some(header) };
        self.call(Method::POST, path, Some(payload)).await
    }

    async fn call(&self, method: Method, target: &str, body: Option<Payload>) -> Result<Value> {
        let what = format!("{method} {}{target}", self.base_path);
        let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, target, body))
            .await
            .map_err(|_| anyhow!("{what}: no answer within {} s", REQUEST_TIMEOUT.as_secs()))?
            .with_context(|| format!("{what} (server {})", self.authority))?;
        decode(status, &bytes).with_context(|| what)
    }

    async fn exchange(
        &self,
        method: Method,
        target: &str,
        body: Option<Payload>,
    ) -> Result<(StatusCode, Bytes)> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .context("could not connect (is `wildcam-fleet serve` running?)")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(connection);
        let request = self.request(method, target, body)?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    fn request(&self, method: Method, target: &str, body: Option<Payload>) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{target}", self.base_path))
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let Some(payload) = body else {
            return Ok(builder.body(Full::new(Bytes::new()))?);
        };
        builder = builder.header(header::CONTENT_TYPE, payload.content_type);
        if let Some((name, value)) = payload.header {
            builder = builder.header(name, value);
        }
        Ok(builder.body(Full::new(Bytes::from(payload.bytes)))?)
    }
}

/// A request body and how to describe it.
struct Payload {
    bytes: Vec<u8>,
    content_type: &'static str,
    header: Option<(&'static str, String)>,
}

/// The JSON of a successful answer, or the API error as a message.
fn decode(status: StatusCode, bytes: &[u8]) -> Result<Value> {
    let value: Option<Value> = if bytes.is_empty() { None } else { serde_json::from_slice(bytes).ok() };
    if status.is_success() {
        return match (value, bytes.is_empty()) {
            (Some(value), _) => Ok(value),
            (None, true) => Ok(Value::Null),
            (None, false) => bail!("{status}: the answer is not JSON"),
        };
    }
    let error = value.as_ref().and_then(|v| v.get("error"));
    let code = error.and_then(|e| e["code"].as_str()).unwrap_or("unknown");
    let message = error
        .and_then(|e| e["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned());
    let hint = if status == StatusCode::UNAUTHORIZED {
        " (pass --token or set WILDCAM_TOKEN; create one with `wildcam-fleet token create`)"
    } else {
        ""
    };
    bail!("{status} {code}: {message}{hint}")
}

/// Percent-encodes one path segment (device ids, token ids, keys).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_checked() {
        let client = ApiClient::new("http://127.0.0.1:18080", None).unwrap();
        assert_eq!(client.authority, "127.0.0.1:18080");
        assert_eq!(client.base_path, "/api/v1");
        let client = ApiClient::new("http://fleet.example/prefix/", None).unwrap();
        assert_eq!(client.authority, "fleet.example:80");
        assert_eq!(client.base_path, "/prefix/api/v1");
        assert!(ApiClient::new("https://fleet.example", None).is_err());
        assert!(ApiClient::new("127.0.0.1:18080", None).is_err());
    }

    #[test]
    fn errors_become_messages() {
        let body = br#"{"error":{"code":"device_not_found","message":"device x not found"}}"#;
        let error = decode(StatusCode::NOT_FOUND, body).unwrap_err().to_string();
        assert_eq!(error, "404 Not Found device_not_found: device x not found");
        assert_eq!(decode(StatusCode::NO_CONTENT, b"").unwrap(), Value::Null);
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }
}

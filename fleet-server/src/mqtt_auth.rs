//! `POST /mqtt/auth`: the authentication hook an external broker calls for each MQTT
//! CONNECT, so that devices are admitted by the server's own registry in external-broker
//! mode, exactly as the embedded broker admits them.
//!
//! The request and answer follow the HTTP authentication of EMQX (and of brokers with a
//! compatible HTTP backend): the broker posts
//! `{"clientid": "...", "username": "...", "password": "..."}` (other members are
//! ignored) and the server answers `200 {"result": "allow"}` or `200 {"result": "deny"}`.
//! Configure the broker to send `Content-Type: application/json` and, when
//! `external_mqtt.auth_hook_secret` is set, the secret in the [`AUTH_HOOK_SECRET_HEADER`]
//! header; a missing or wrong secret is a 403, a malformed body a 400, both with the
//! API's JSON error body. In embedded mode the route answers 404.
//!
//! The decision is the embedded broker's (`crate::credentials`): a device connects with
//! its id as client id and user name and its password, until it is revoked; unclaimed
//! traps use the shared `provision` account; empty fields are refused. In addition, the
//! server's own client ids (`external_mqtt.client_id` and its `-downlink` twin) are
//! admitted only with the server's own `username`/`password`, and that user name only on
//! those client ids: a broker disconnects a session when another connection presents its
//! client id, so nobody else may take them.
//!
//! Only connections are checked, not topics: the server trusts no broker for
//! authorization and decides on opened frames (`ARCHITECTURE.md`).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::ApiError;
use crate::broker::{Authenticator, ExternalBrokerConfig};
use crate::credentials::CredentialCache;
use crate::server::AppState;
use crate::store::constant_time_eq;

/// Where the hook is served on the HTTP listener.
pub const PATH: &str = "/mqtt/auth";
/// Header carrying `external_mqtt.auth_hook_secret`.
pub const AUTH_HOOK_SECRET_HEADER: &str = "x-wildcam-hook-secret";
/// Largest request body accepted, bytes.
pub const BODY_LIMIT_BYTES: usize = 4 * 1024;

/// The hook's decision state: the device credentials and the server's own account.
#[derive(Clone)]
pub struct MqttAuthHook {
    credentials: CredentialCache,
    secret: Option<[u8; 32]>,
    server_client_ids: [String; 2],
    server_account: Option<(String, [u8; 32])>,
}

impl std::fmt::Debug for MqttAuthHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAuthHook")
            .field("server_client_ids", &self.server_client_ids)
            .field("secret", &self.secret.map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl MqttAuthHook {
    /// A hook deciding with `credentials`, protected and completed by `config`.
    pub fn new(credentials: CredentialCache, config: &ExternalBrokerConfig) -> Self {
        let server_account = match (&config.username, &config.password) {
            (Some(username), Some(password)) => Some((username.clone(), digest(password.as_bytes()))),
            _ => None,
        };
        Self {
            credentials,
            secret: config
                .auth_hook_secret
                .as_ref()
                .map(|secret| digest(secret.as_bytes())),
            server_client_ids: [config.client_id.clone(), config.downlink_client_id()],
            server_account,
        }
    }

    /// Whether a connection with these credentials is admitted (see the module docs).
    pub fn decide(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id.is_empty() || username.is_empty() || password.is_empty() {
            return false;
        }
        let server_user = self
            .server_account
            .as_ref()
            .is_some_and(|(name, _)| name == username);
        if self.server_client_ids.iter().any(|id| id == client_id) || server_user {
            return server_user && self.server_password_matches(password) && self.is_server_client(client_id);
        }
        self.credentials.authenticate(client_id, username, password)
    }

    /// Whether the request carries the configured secret (always, when none is configured).
    pub fn secret_matches(&self, header: Option<&HeaderValue>) -> bool {
        match (&self.secret, header) {
            (None, _) => true,
            (Some(expected), Some(given)) => constant_time_eq(&digest(given.as_bytes()), expected),
            (Some(_), None) => false,
        }
    }

    fn is_server_client(&self, client_id: &str) -> bool {
        self.server_client_ids.iter().any(|id| id == client_id)
    }

    fn server_password_matches(&self, password: &str) -> bool {
        self.server_account
            .as_ref()
            .is_some_and(|(_, expected)| constant_time_eq(&digest(password.as_bytes()), expected))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Body of `POST /mqtt/auth`.
#[derive(Debug, Deserialize)]
pub struct AuthRequest {
    /// The MQTT client id.
    pub clientid: String,
    /// The MQTT user name.
    pub username: String,
    /// The MQTT password.
    pub password: String,
}

/// Answer of `POST /mqtt/auth`.
#[derive(Debug, Serialize)]
pub struct AuthAnswer {
    /// `allow` or `deny`.
    pub result: &'static str,
}

/// `POST /mqtt/auth`.
pub async fn authenticate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<AuthRequest>, JsonRejection>,
) -> Result<Json<AuthAnswer>, ApiError> {
    let Some(hook) = &state.mqtt_auth else {
        return Err(ApiError::not_found(
            "mqtt_auth_disabled",
            "the MQTT authentication hook is served only in external broker mode (external_mqtt.enabled)",
        ));
    };
    if !hook.secret_matches(headers.get(AUTH_HOOK_SECRET_HEADER)) {
        return Err(ApiError::forbidden(format!("missing or wrong {AUTH_HOOK_SECRET_HEADER} header")));
    }
    let Json(request) = body?;
    let allowed = hook.decide(&request.clientid, &request.username, &request.password);
    if !allowed {
        tracing::info!(
            client_id = request.clientid,
            username = request.username,
            "mqtt connect refused (hook)"
        );
    }
    Ok(Json(AuthAnswer { result: if allowed { "allow" } else { "deny" } }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::PROVISION_USERNAME;
    use crate::store::{DeviceStatus, PasswordHash};

    fn hook() -> MqttAuthHook {
        let credentials = CredentialCache::new(Some("fleet-provisioning"));
        credentials.upsert("wc-1", PasswordHash::of("device-pw"), DeviceStatus::Active);
        let config = ExternalBrokerConfig {
            username: Some("fleet".into()),
            password: Some("fleet-pw".into()),
            auth_hook_secret: Some("0123456789abcdef".into()),
            ..ExternalBrokerConfig::loopback(1883)
        };
        MqttAuthHook::new(credentials, &config)
    }

    #[test]
    fn devices_provisioning_and_the_server_itself() {
        let hook = hook();
        assert!(hook.decide("wc-1", "wc-1", "device-pw"));
        assert!(!hook.decide("wc-1", "wc-1", "guess"));
        assert!(!hook.decide("wc-2", "wc-1", "device-pw"), "client id must be the user name");
        assert!(hook.decide("unclaimed-1", PROVISION_USERNAME, "fleet-provisioning"));
        assert!(hook.decide("wildcam-fleet-1", "fleet", "fleet-pw"));
        assert!(hook.decide("wildcam-fleet-1-downlink", "fleet", "fleet-pw"));
        assert!(!hook.decide("wildcam-fleet-1", "fleet", "guess"));
        assert!(!hook.decide("other", "fleet", "fleet-pw"), "the server's user only on its client ids");
        assert!(!hook.decide("wildcam-fleet-1", "wc-1", "device-pw"), "nobody else takes the server's ids");
        assert!(!hook.decide("", "", ""));
    }

    #[test]
    fn the_secret_is_required_when_configured() {
        let hook = hook();
        assert!(hook.secret_matches(Some(&HeaderValue::from_static("0123456789abcdef"))));
        assert!(!hook.secret_matches(Some(&HeaderValue::from_static("0123456789abcdeX"))));
        assert!(!hook.secret_matches(None));
        let open = MqttAuthHook::new(CredentialCache::new(None), &ExternalBrokerConfig::default());
        assert!(open.secret_matches(None));
    }
}

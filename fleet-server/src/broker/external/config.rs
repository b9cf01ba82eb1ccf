//! Settings of the external-broker mode, and how they map onto rumqttc's options.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::super::BrokerError;
use super::super::config::{CHANNEL_CAPACITY_LIMIT, MAX_PAYLOAD_SIZE_LIMIT, MAX_PAYLOAD_SIZE_MIN, in_range};

/// Longest client id accepted, so that the downlink connection's id (with
/// [`DOWNLINK_CLIENT_SUFFIX`]) stays within 64 bytes.
pub const CLIENT_ID_LEN_MAX: usize = 48;
/// Longest shared-subscription group name accepted.
pub const SHARED_GROUP_LEN_MAX: usize = 64;
/// Appended to [`ExternalBrokerConfig::client_id`] for the connection that publishes downlinks.
pub const DOWNLINK_CLIENT_SUFFIX: &str = "-downlink";
/// Shortest shared secret accepted for the authentication hook.
pub const AUTH_HOOK_SECRET_LEN_MIN: usize = 16;
/// Longest session expiry accepted: one week.
pub const SESSION_EXPIRY_S_MAX: u32 = 7 * 24 * 3600;

/// The fleet server as an MQTT 5 client of an external broker (Mosquitto, EMQX, a
/// cluster), instead of running rumqttd itself. Readable from the `[external_mqtt]` section
/// of the server's TOML configuration; every field has a default and unknown fields are
/// refused. Nothing changes until `enabled = true`; then `[mqtt]` (the embedded broker)
/// is not used.
///
/// The server opens two connections: `client_id` holds the persistent session with the
/// shared subscriptions to every uplink (`$share/{shared_group}/wc/v1/dev/+/up/#` and
/// `$share/{shared_group}/wc/v1/prov/+/up`), and `{client_id}-downlink` publishes acks,
/// configuration and commands. Several servers with the same `shared_group` and distinct
/// `client_id`s split the uplinks between them (but see the broker module docs: they also
/// need a shared store).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExternalBrokerConfig {
    /// Use the external broker (default `false`: the embedded broker runs).
    pub enabled: bool,
    /// Host name or IP address of the broker (default `127.0.0.1`).
    pub host: String,
    /// TCP port of the broker (default 1883; brokers usually serve TLS on 8883).
    pub port: u16,
    /// Connect with TLS (default `false`); needs `ca_file`. The broker's certificate must
    /// name `host` (DNS name or IP address).
    pub tls: bool,
    /// PEM file of the certificates trusted to sign the broker's: a private CA, or for a
    /// publicly trusted broker the system bundle (`/etc/ssl/certs/ca-certificates.crt` on
    /// Debian). Required with `tls`.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain the server presents to the broker (mutual TLS); with
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Client id of the uplink session (default `wildcam-fleet-1`): ASCII letters, digits,
    /// `-`, `_` and `.`, at most [`CLIENT_ID_LEN_MAX`] bytes. Must be unique per server
    /// instance: a broker disconnects an existing connection when another one presents
    /// the same id. The downlink connection uses this id plus [`DOWNLINK_CLIENT_SUFFIX`].
    pub client_id: String,
    /// User name of both connections; with `password`, or neither.
    pub username: Option<String>,
    /// Password of both connections. Prefer `WILDCAM__EXTERNAL_MQTT__PASSWORD` to a file.
    pub password: Option<String>,
    /// Shared-subscription group (default `wildcam-fleet`): the servers of one fleet use
    /// the same group, so that each uplink reaches exactly one of them. No `/`, `+`, `#`,
    /// whitespace or control character; at most [`SHARED_GROUP_LEN_MAX`] bytes.
    pub shared_group: String,
    /// MQTT keep-alive, seconds (default 30; 5 to 3,600).
    pub keep_alive_s: u16,
    /// How long the broker keeps the uplink session (its subscriptions and the uplinks
    /// queued for it) while the server is away, seconds (default 3,600; at most
    /// [`SESSION_EXPIRY_S_MAX`]; 0 ends it at each disconnection).
    pub session_expiry_s: u32,
    /// QoS 1 uplinks the broker may send before the server acknowledges them (MQTT 5
    /// Receive Maximum; default 100; 1 to 65,535). While ingest is behind, the server stops
    /// reading and acknowledging, so this is how many uplinks are in flight at most.
    pub receive_maximum: u16,
    /// Largest MQTT packet either connection accepts or sends, bytes (default 4 KiB;
    /// 2 KiB to 1 MiB). Announced to the broker, which must drop bigger uplinks instead of
    /// sending them; downlink payloads above it are refused.
    pub max_packet_size: u32,
    /// Uplinks read from the broker and waiting for ingest (default 1,024).
    pub inbound_queue_len_max: usize,
    /// Downlink publishes waiting to be sent (default 1,024).
    pub downlink_queue_len_max: usize,
    /// How long starting waits for both connections and the uplink subscriptions,
    /// milliseconds (default 10,000; 100 to 300,000).
    pub connect_timeout_ms: u64,
    /// First delay before reconnecting after a loss, milliseconds (default 200); each
    /// failed attempt doubles it, with jitter.
    pub reconnect_delay_initial_ms: u32,
    /// Longest delay between reconnection attempts, milliseconds (default 30,000; at most
    /// 300,000).
    pub reconnect_delay_max_ms: u32,
    /// Shared secret that brokers must send in the [`AUTH_HOOK_SECRET_HEADER`] header
    /// when they call `POST /mqtt/auth`; at least [`AUTH_HOOK_SECRET_LEN_MIN`]
    /// characters. Unset, the hook answers anyone who reaches the HTTP listener. Prefer
    /// `WILDCAM__EXTERNAL_MQTT__AUTH_HOOK_SECRET` to a file.
    ///
    /// [`AUTH_HOOK_SECRET_HEADER`]: crate::mqtt_auth::AUTH_HOOK_SECRET_HEADER
    pub auth_hook_secret: Option<String>,
}

impl Default for ExternalBrokerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            client_id: "wildcam-fleet-1".into(),
            username: None,
            password: None,
            shared_group: "wildcam-fleet".into(),
            keep_alive_s: 30,
            session_expiry_s: 3_600,
            receive_maximum: 100,
            max_packet_size: 4 * 1024,
            inbound_queue_len_max: 1024,
            downlink_queue_len_max: 1024,
            connect_timeout_ms: 10_000,
            reconnect_delay_initial_ms: 200,
            reconnect_delay_max_ms: 30_000,
            auth_hook_secret: None,
        }
    }
}

/// Secrets are never printed.
impl std::fmt::Debug for ExternalBrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("ExternalBrokerConfig")
            .field("enabled", &self.enabled)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("shared_group", &self.shared_group)
            .field("keep_alive_s", &self.keep_alive_s)
            .field("session_expiry_s", &self.session_expiry_s)
            .field("receive_maximum", &self.receive_maximum)
            .field("max_packet_size", &self.max_packet_size)
            .field("inbound_queue_len_max", &self.inbound_queue_len_max)
            .field("downlink_queue_len_max", &self.downlink_queue_len_max)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("reconnect_delay_initial_ms", &self.reconnect_delay_initial_ms)
            .field("reconnect_delay_max_ms", &self.reconnect_delay_max_ms)
            .field("auth_hook_secret", &redacted(&self.auth_hook_secret))
            .finish()
    }
}

impl ExternalBrokerConfig {
    /// A configuration for a broker on 127.0.0.1:`port`, enabled, for tests and tools.
    pub fn loopback(port: u16) -> Self {
        Self { enabled: true, port, ..Self::default() }
    }

    /// `host:port`, for logs and for showing where traps connect.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Client id of the downlink connection.
    pub fn downlink_client_id(&self) -> String {
        format!("{}{DOWNLINK_CLIENT_SUFFIX}", self.client_id)
    }

    /// Checks every field; the first problem found is named.
    pub fn validate(&self) -> Result<(), BrokerError> {
        self.validate_address()?;
        self.validate_tls()?;
        validate_client_id(&self.client_id)?;
        validate_shared_group(&self.shared_group)?;
        self.validate_credentials()?;
        in_range("external_mqtt.keep_alive_s", usize::from(self.keep_alive_s), 5, 3_600)?;
        in_range(
            "external_mqtt.session_expiry_s",
            self.session_expiry_s as usize,
            0,
            SESSION_EXPIRY_S_MAX as usize,
        )?;
        in_range(
            "external_mqtt.receive_maximum",
            usize::from(self.receive_maximum),
            1,
            usize::from(u16::MAX),
        )?;
        in_range(
            "external_mqtt.max_packet_size",
            self.max_packet_size as usize,
            MAX_PAYLOAD_SIZE_MIN,
            MAX_PAYLOAD_SIZE_LIMIT,
        )?;
        in_range(
            "external_mqtt.inbound_queue_len_max",
            self.inbound_queue_len_max,
            1,
            CHANNEL_CAPACITY_LIMIT,
        )?;
        in_range(
            "external_mqtt.downlink_queue_len_max",
            self.downlink_queue_len_max,
            1,
            CHANNEL_CAPACITY_LIMIT,
        )?;
        in_range("external_mqtt.connect_timeout_ms", self.connect_timeout_ms as usize, 100, 300_000)?;
        in_range("external_mqtt.reconnect_delay_max_ms", self.reconnect_delay_max_ms as usize, 1, 300_000)?;
        in_range(
            "external_mqtt.reconnect_delay_initial_ms",
            self.reconnect_delay_initial_ms as usize,
            1,
            self.reconnect_delay_max_ms as usize,
        )?;
        Ok(())
    }

    fn validate_address(&self) -> Result<(), BrokerError> {
        let host = self.host.as_str();
        let problem = if host.is_empty() {
            Some("is empty")
        } else if host.contains("://") {
            Some("must be a host name or IP address, not a URL")
        } else if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            Some("contains whitespace, a control character or '/'")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(invalid(format!("external_mqtt.host {host:?} {problem}")));
        }
        if self.port == 0 {
            return Err(invalid("external_mqtt.port must not be 0".into()));
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), BrokerError> {
        let client_files = (&self.client_cert_file, &self.client_key_file);
        if matches!(client_files, (Some(_), None) | (None, Some(_))) {
            return Err(invalid(
                "external_mqtt.client_cert_file and external_mqtt.client_key_file must be set together"
                    .into(),
            ));
        }
        let any_file = self.ca_file.is_some() || self.client_cert_file.is_some();
        match (self.tls, self.ca_file.is_some()) {
            (true, false) => Err(invalid("external_mqtt.tls needs external_mqtt.ca_file".into())),
            (false, _) if any_file => Err(invalid(
                "external_mqtt.ca_file and client_cert_file are only used with external_mqtt.tls = true"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Plain TCP, or TLS with the configured files, read and checked now (the same
    /// configuration serves both connections).
    pub(super) fn transport(&self) -> Result<Transport, BrokerError> {
        let Some(ca_file) = self.ca_file.as_deref().filter(|_| self.tls) else {
            return Ok(Transport::Tcp);
        };
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(read_certificates("ca_file", ca_file)?);
        if added == 0 {
            return Err(file_error("ca_file", ca_file, "holds no usable CA certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| invalid(format!("external_mqtt TLS: {error}")))?
            .with_root_certificates(roots);
        let config = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certificates("client_cert_file", cert)?, read_key(key)?)
                .map_err(|error| file_error("client_key_file", key, &error.to_string()))?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))))
    }

    fn validate_credentials(&self) -> Result<(), BrokerError> {
        match (&self.username, &self.password) {
            (Some(username), Some(_)) if username.is_empty() => {
                Err(invalid("external_mqtt.username must not be empty".into()))
            }
            (Some(_), None) | (None, Some(_)) => {
                Err(invalid("external_mqtt.username and external_mqtt.password must be set together".into()))
            }
            _ => Ok(()),
        }?;
        match &self.auth_hook_secret {
            Some(secret) if secret.chars().count() < AUTH_HOOK_SECRET_LEN_MIN => Err(invalid(format!(
                "external_mqtt.auth_hook_secret must be at least {AUTH_HOOK_SECRET_LEN_MIN} characters"
            ))),
            _ => Ok(()),
        }
    }

    /// Options of one of the two connections: MQTT 5, persistent session, rumqttc's
    /// automatic acknowledgements.
    pub(super) fn options(&self, client_id: String, transport: Transport) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        options.set_transport(transport);
        options.set_keep_alive(Duration::from_secs(u64::from(self.keep_alive_s)));
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(self.session_expiry_s));
        options.set_receive_maximum(Some(self.receive_maximum));
        options.set_max_packet_size(Some(self.max_packet_size));
        options.set_connection_timeout(connection_attempt_timeout_s(self.connect_timeout_ms));
        options.set_manual_acks(false);
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            options.set_credentials(username.clone(), password.clone());
        }
        options
    }
}

fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, BrokerError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| file_error(key, path, &error.to_string()))?;
    if certificates.is_empty() {
        return Err(file_error(key, path, "holds no PEM certificate"));
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, BrokerError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|error| file_error("client_key_file", path, &error.to_string()))
}

fn file_error(key: &str, path: &Path, problem: &str) -> BrokerError {
    invalid(format!("external_mqtt.{key} {}: {problem}", path.display()))
}

/// Time one TCP connect plus CONNACK may take: rumqttc counts it in whole seconds.
fn connection_attempt_timeout_s(connect_timeout_ms: u64) -> u64 {
    connect_timeout_ms.div_ceil(1000).clamp(1, 10)
}

fn validate_client_id(client_id: &str) -> Result<(), BrokerError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if client_id.is_empty() || client_id.len() > CLIENT_ID_LEN_MAX || !client_id.chars().all(allowed) {
        return Err(invalid(format!(
            "external_mqtt.client_id {client_id:?} must be 1 to {CLIENT_ID_LEN_MAX} ASCII letters, \
             digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

fn validate_shared_group(group: &str) -> Result<(), BrokerError> {
    let problem = if group.is_empty() {
        Some("is empty")
    } else if group.len() > SHARED_GROUP_LEN_MAX {
        Some("is longer than 64 bytes")
    } else if group.contains(['/', '+', '#']) {
        Some("contains '/', '+' or '#' (not allowed in an MQTT share name)")
    } else if group.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or a control character")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(invalid(format!("external_mqtt.shared_group {group:?} {problem}"))),
        None => Ok(()),
    }
}

fn invalid(message: String) -> BrokerError {
    BrokerError::InvalidConfig(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(config: ExternalBrokerConfig, needle: &str) {
        let error = config.validate().expect_err("must be refused").to_string();
        assert!(error.contains(needle), "{error:?} does not mention {needle:?}");
    }

    #[test]
    fn defaults_are_valid_and_disabled() {
        let config = ExternalBrokerConfig::default();
        config.validate().expect("defaults validate");
        assert!(!config.enabled);
        assert_eq!(config.address(), "127.0.0.1:1883");
        assert_eq!(config.downlink_client_id(), "wildcam-fleet-1-downlink");
    }

    #[test]
    fn bad_values_are_named() {
        let base = ExternalBrokerConfig::loopback(1883);
        refused(ExternalBrokerConfig { host: String::new(), ..base.clone() }, "host \"\" is empty");
        refused(ExternalBrokerConfig { host: "mqtt://broker".into(), ..base.clone() }, "not a URL");
        refused(ExternalBrokerConfig { port: 0, ..base.clone() }, "port");
        refused(ExternalBrokerConfig { client_id: String::new(), ..base.clone() }, "client_id");
        refused(ExternalBrokerConfig { client_id: "a/b".into(), ..base.clone() }, "client_id");
        refused(ExternalBrokerConfig { client_id: "x".repeat(49), ..base.clone() }, "client_id");
        for group in ["a/b", "a+", "#", "fleet/+/x"] {
            refused(ExternalBrokerConfig { shared_group: group.into(), ..base.clone() }, "'/', '+' or '#'");
        }
        refused(ExternalBrokerConfig { shared_group: String::new(), ..base.clone() }, "is empty");
        refused(ExternalBrokerConfig { shared_group: "a b".into(), ..base.clone() }, "whitespace");
        refused(ExternalBrokerConfig { username: Some("u".into()), ..base.clone() }, "set together");
        refused(ExternalBrokerConfig { password: Some("p".into()), ..base.clone() }, "set together");
        refused(ExternalBrokerConfig { keep_alive_s: 4, ..base.clone() }, "keep_alive_s");
        refused(ExternalBrokerConfig { receive_maximum: 0, ..base.clone() }, "receive_maximum");
        refused(ExternalBrokerConfig { max_packet_size: 100, ..base.clone() }, "max_packet_size");
        refused(ExternalBrokerConfig { inbound_queue_len_max: 0, ..base.clone() }, "inbound_queue_len_max");
        refused(ExternalBrokerConfig { connect_timeout_ms: 0, ..base.clone() }, "connect_timeout_ms");
        refused(
            ExternalBrokerConfig { reconnect_delay_initial_ms: 60_000, ..base.clone() },
            "reconnect_delay_initial_ms",
        );
        refused(ExternalBrokerConfig { tls: true, ..base.clone() }, "needs external_mqtt.ca_file");
        refused(ExternalBrokerConfig { ca_file: Some("ca.pem".into()), ..base.clone() }, "only used with");
        refused(
            ExternalBrokerConfig { tls: true, client_key_file: Some("k.pem".into()), ..base.clone() },
            "set together",
        );
        refused(ExternalBrokerConfig { auth_hook_secret: Some("short".into()), ..base }, "auth_hook_secret");
    }

    #[test]
    fn toml_with_defaults_and_secrets_redacted() {
        let config: ExternalBrokerConfig = toml::from_str(
            "enabled = true\nhost = \"broker\"\nusername = \"fleet\"\npassword = \"hunter22\"\n",
        )
        .expect("valid TOML");
        assert!(config.enabled);
        assert_eq!(config.address(), "broker:1883");
        assert!(!format!("{config:?}").contains("hunter22"));
        assert!(toml::from_str::<ExternalBrokerConfig>("hots = \"typo\"").is_err());
        let v6 = ExternalBrokerConfig { host: "::1".into(), ..ExternalBrokerConfig::default() };
        assert_eq!(v6.address(), "[::1]:1883");
    }

    #[test]
    fn tls_files_are_read_up_front_with_clear_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.pem");
        let config = ExternalBrokerConfig {
            tls: true,
            ca_file: Some(missing.clone()),
            ..ExternalBrokerConfig::loopback(8883)
        };
        let error = config.transport().err().expect("refused").to_string();
        assert!(error.contains("external_mqtt.ca_file") && error.contains("missing.pem"), "{error}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("written");
        let config = ExternalBrokerConfig { ca_file: Some(empty), ..config };
        let error = config.transport().err().expect("refused").to_string();
        assert!(error.contains("holds no PEM certificate"), "{error}");
        assert!(matches!(ExternalBrokerConfig::default().transport(), Ok(Transport::Tcp)));
    }

    #[test]
    fn connection_attempts_are_bounded_in_whole_seconds() {
        assert_eq!(connection_attempt_timeout_s(100), 1);
        assert_eq!(connection_attempt_timeout_s(10_000), 10);
        assert_eq!(connection_attempt_timeout_s(300_000), 10);
    }
}

//! Wiring: the store, the broker (embedded, or a client of an external one),
//! ingest, provisioning and the HTTP endpoints, started together and stopped
//! together.
//!
//! [`Server::start`] returns once everything listens; [`Server::shutdown`]
//! stops intake, lets ingest commit and ack the batch in hand, and closes the
//! store (which drains its writer and checkpoints).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use wildcam_sdk::provision::ServerIdentity;

use crate::broker::{LinkStatsReader, Publisher, RunningBroker};
use crate::config::Config;
use crate::credentials::CredentialCache;
use crate::downlink::Downlink;
use crate::http;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::mqtt_auth::MqttAuthHook;
use crate::ota::{Ota, OtaSettings};
use crate::provisioning::Provisioning;
use crate::sessions::Sessions;
use crate::store::{Clock, DeviceQuery, PageRequest, SqliteConfig, SqliteStore, Store, SystemClock};

/// File in the data directory holding the server's ed25519 identity seed.
pub const IDENTITY_FILE: &str = "server-identity.key";
/// Claim messages waiting for the provisioning task.
const PROVISIONING_QUEUE_LEN: usize = 256;

/// What the HTTP layer and operators reach.
#[derive(Clone)]
pub struct AppState {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Broker admission.
    pub credentials: CredentialCache,
    /// Device crypto state.
    pub sessions: Sessions,
    /// Sending to devices.
    pub downlink: Downlink,
    /// Firmware updates.
    pub ota: Ota,
    /// The server's public identity (devices may pin it).
    pub identity_public_key: [u8; 32],
    /// Timestamps.
    pub clock: Arc<dyn Clock>,
    /// Counters of the broker link (messages lost before ingest read them,
    /// connections held by the broker, reconnections).
    pub link_stats: LinkStatsReader,
    /// Where devices connect with MQTT 3.1.1, `host:port` (shown by the API): the
    /// embedded listener, or the external broker.
    pub mqtt_v4: String,
    /// Where devices connect with MQTT 5, `host:port` (shown by the API).
    pub mqtt_v5: String,
    /// The external broker's authentication hook (`POST /mqtt/auth`); `None` in
    /// embedded mode.
    pub mqtt_auth: Option<MqttAuthHook>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// A running fleet server.
#[derive(Debug)]
pub struct Server {
    broker: RunningBroker,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    ingest: JoinHandle<()>,
    http: JoinHandle<()>,
    state: AppState,
}

impl Server {
    /// Opens the store (creating the data directory), starts the broker,
    /// ingest, provisioning and HTTP, and returns once all listen.
    pub async fn start(config: Config) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("could not create data directory {}", config.data_dir.display()))?;
        let identity = load_or_create_identity(&config.data_dir)?;
        let ota_settings = OtaSettings::from_config(&config.ota).map_err(anyhow::Error::msg)?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(SqliteConfig::new(config.data_dir.clone()))
                .await
                .context("opening the store")?,
        );
        let credentials = CredentialCache::new(config.provisioning.password.as_deref());
        load_credentials(&store, &credentials).await?;
        let external = config.external_mqtt.clone();
        let (broker, link) = RunningBroker::start(config.mqtt.clone(), external, credentials.clone())
            .await
            .context("starting the MQTT broker (or connecting to the external one)")?;
        let (mqtt_v4, mqtt_v5) = broker.device_endpoints();
        let mqtt_auth = config
            .external_mqtt
            .enabled
            .then(|| MqttAuthHook::new(credentials.clone(), &config.external_mqtt));
        let metrics = Arc::new(Metrics::default());
        let sessions = Sessions::new(store.clone());
        let publisher = link.publisher();
        let downlink =
            Downlink::new(sessions.clone(), publisher.clone(), store.clone(), clock.clone(), metrics.clone());
        let link_stats = link.stats_reader();
        let ota =
            Ota::start(store.clone(), downlink.clone(), metrics.clone(), ota_settings, &config.data_dir);
        let state = AppState {
            store: store.clone(),
            metrics: metrics.clone(),
            credentials: credentials.clone(),
            sessions: sessions.clone(),
            downlink: downlink.clone(),
            ota: ota.clone(),
            identity_public_key: identity.public_key(),
            clock: clock.clone(),
            link_stats,
            mqtt_v4,
            mqtt_v5,
            mqtt_auth,
        };
        let (stop, stop_rx) = watch::channel(false);
        let provisioning =
            spawn_provisioning(&state, identity, publisher, config.provisioning.attempts_per_minute);
        let ingest = Ingest {
            store,
            sessions,
            downlink,
            ota,
            metrics,
            clock,
            config: config.ingest.clone(),
            provisioning,
        };
        let ingest = tokio::spawn(ingest.run(link, stop_rx.clone()));
        let (http_addr, http) = http::serve(config.http.listen, state.clone(), stop_rx).await?;
        tracing::info!(
            mqtt_v4 = %state.mqtt_v4, mqtt_v5 = %state.mqtt_v5, http = %http_addr,
            data_dir = %config.data_dir.display(), "fleet server started"
        );
        Ok(Self { broker, http_addr, stop, ingest, http, state })
    }

    /// The embedded broker's MQTT 3.1.1 listener; `None` with an external broker.
    pub fn mqtt_v4(&self) -> Option<SocketAddr> {
        self.broker.listen_v4()
    }

    /// The embedded broker's MQTT 5 listener; `None` with an external broker.
    pub fn mqtt_v5(&self) -> Option<SocketAddr> {
        self.broker.listen_v5()
    }

    /// The HTTP listener.
    pub fn http(&self) -> SocketAddr {
        self.http_addr
    }

    /// Shared state (store, metrics...), for operator tasks and tests.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops intake, commits and acks what ingest holds, closes the store.
    ///
    /// The broker link stays up until ingest has committed its last batch, so
    /// that batch is acknowledged; messages the broker delivers after intake
    /// stopped are not acknowledged, and traps resend them.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        if self.ingest.await.is_err() {
            tracing::error!("ingest task panicked");
        }
        self.broker.shutdown().await;
        let _ = self.http.await;
        self.state
            .store
            .close()
            .await
            .context("closing the store")?;
        tracing::info!("fleet server stopped");
        Ok(())
    }
}

fn spawn_provisioning(
    state: &AppState,
    identity: ServerIdentity,
    publisher: Publisher,
    attempts_per_minute: u32,
) -> mpsc::Sender<crate::broker::Inbound> {
    let (sender, receiver) = mpsc::channel(PROVISIONING_QUEUE_LEN);
    let service = Provisioning {
        store: state.store.clone(),
        identity,
        publisher,
        credentials: state.credentials.clone(),
        metrics: state.metrics.clone(),
        clock: state.clock.clone(),
        attempts_per_minute,
    };
    tokio::spawn(service.run(receiver));
    sender
}

/// Revokes a device everywhere at once: in the store, at the broker (no
/// reconnect) and in ingest (its messages are refused from now on).
pub async fn revoke_device(
    state: &AppState,
    device: &wildcam_sdk::DeviceId,
) -> Result<(), crate::store::StoreError> {
    state.store.revoke_device(device.clone()).await?;
    state.credentials.revoke(device.as_str());
    state.sessions.revoke(device).await;
    tracing::info!(device = device.as_str(), "device revoked");
    Ok(())
}

/// Fills the broker's credential cache with every registered device.
async fn load_credentials(store: &Arc<dyn Store>, cache: &CredentialCache) -> Result<()> {
    let mut query =
        DeviceQuery { page: PageRequest::first(crate::store::PAGE_LIMIT_MAX), ..DeviceQuery::default() };
    loop {
        let page = store
            .list_devices(query.clone())
            .await
            .context("loading devices")?;
        for device in &page.items {
            if let Some(credentials) = store.device_credentials(device.id.clone()).await? {
                cache.upsert(device.id.as_str(), credentials.mqtt_password_hash, credentials.status);
            }
        }
        let Some(next) = page.next else { break };
        query.page = PageRequest::after(crate::store::PAGE_LIMIT_MAX, next);
    }
    tracing::info!(devices = cache.len(), "device credentials loaded");
    Ok(())
}

/// Reads the server's identity seed, creating it (mode 0600) on first start.
fn load_or_create_identity(data_dir: &Path) -> Result<ServerIdentity> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("{} must hold exactly 32 bytes", path.display()))?;
            Ok(ServerIdentity::from_seed(seed))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("could not create {}", path.display()))?;
            file.write_all(&seed)?;
            file.sync_all()?;
            Ok(ServerIdentity::from_seed(seed))
        }
        Err(error) => Err(error).with_context(|| format!("could not read {}", path.display())),
    }
}

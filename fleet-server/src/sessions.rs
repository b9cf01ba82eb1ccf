//! Per-device crypto state: the key, the uplink replay window and the
//! downlink sealer, loaded from the store on a device's first message and
//! kept in memory.
//!
//! Each device's state sits behind its own async mutex, held across the one
//! await that matters: persisting a new downlink counter reservation before
//! a frame using it is published, so no counter is ever used twice even if
//! the server dies right after publishing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::Mutex;
use wildcam_sdk::DeviceId;
use wildcam_sdk::seal::{self, OpenError, ReplayWindow, SEAL_OVERHEAD, Sealer, SessionKey};
use wildcam_sdk::topic::Direction;

use crate::store::{DeviceKeys, DeviceStatus, Store, StoreError};

/// Why a device's frame could not be opened or sealed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No device has this id.
    #[error("unknown device")]
    Unknown,
    /// The device is revoked.
    #[error("device is revoked")]
    Revoked,
    /// The frame did not open.
    #[error("frame refused: {0}")]
    Open(OpenError),
    /// Sealing failed (counter exhausted: the device must be re-provisioned).
    #[error("sealing failed: {0}")]
    Seal(seal::SealError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A thread panicked while holding the session map.
    #[error("session map poisoned by a panic")]
    Poisoned,
}

struct Session {
    key: SessionKey,
    window: ReplayWindow,
    sealer: Sealer,
    reservation: u32,
    status: DeviceStatus,
}

impl Session {
    fn from_keys(keys: DeviceKeys) -> Self {
        Self {
            sealer: Sealer::resume(keys.session_key.clone(), Direction::Down, keys.downlink_reservation),
            key: keys.session_key,
            window: keys.uplink_window,
            reservation: keys.downlink_reservation,
            status: keys.status,
        }
    }

    fn check_active(&self) -> Result<(), SessionError> {
        match self.status {
            DeviceStatus::Active => Ok(()),
            DeviceStatus::Revoked => Err(SessionError::Revoked),
        }
    }
}

/// The crypto state of every device that has talked since the start.
#[derive(Clone)]
pub struct Sessions {
    store: Arc<dyn Store>,
    devices: Arc<StdMutex<HashMap<DeviceId, Arc<Mutex<Session>>>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    /// An empty cache over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, devices: Arc::default() }
    }

    /// Opens `frame` in place as an uplink frame of `device`, returning the
    /// envelope and the device's window after it (to persist with the batch).
    pub async fn open<'f>(
        &self,
        device: &DeviceId,
        frame: &'f mut [u8],
    ) -> Result<(&'f [u8], ReplayWindow), SessionError> {
        let session = self.session(device).await?;
        let mut session = session.lock().await;
        session.check_active()?;
        let Session { key, window, .. } = &mut *session;
        let plain = seal::open_with(window, key, Direction::Up, device.as_bytes(), frame)
            .map_err(SessionError::Open)?;
        Ok((plain, *window))
    }

    /// Seals `envelope` for `device`'s downlink, persisting a new counter
    /// reservation first when the sealer asks for one.
    pub async fn seal(&self, device: &DeviceId, envelope: &[u8]) -> Result<Vec<u8>, SessionError> {
        let session = self.session(device).await?;
        let mut session = session.lock().await;
        session.check_active()?;
        let mut frame = vec![0u8; envelope.len() + SEAL_OVERHEAD];
        let sealed = session
            .sealer
            .seal(device.as_bytes(), envelope, &mut frame)
            .map_err(SessionError::Seal)?;
        if let Some(reservation) = sealed.persist_reservation {
            let expected = session.reservation;
            if let Err(error) = self
                .store
                .persist_downlink_reservation(device.clone(), expected, reservation)
                .await
            {
                // Another writer moved it, or the store failed: start over from
                // what is stored next time rather than risk a reused counter.
                self.forget(device);
                return Err(error.into());
            }
            session.reservation = reservation;
        }
        frame.truncate(sealed.len);
        Ok(frame)
    }

    /// Refuses the device from now on (revocation).
    pub async fn revoke(&self, device: &DeviceId) {
        let existing = self
            .devices
            .lock()
            .ok()
            .and_then(|d| d.get(device).cloned());
        if let Some(session) = existing {
            session.lock().await.status = DeviceStatus::Revoked;
        }
    }

    fn forget(&self, device: &DeviceId) {
        if let Ok(mut devices) = self.devices.lock() {
            devices.remove(device);
        }
    }

    async fn session(&self, device: &DeviceId) -> Result<Arc<Mutex<Session>>, SessionError> {
        if let Some(session) = self
            .devices
            .lock()
            .ok()
            .and_then(|d| d.get(device).cloned())
        {
            return Ok(session);
        }
        let keys = self
            .store
            .device_keys(device.clone())
            .await?
            .ok_or(SessionError::Unknown)?;
        let loaded = Arc::new(Mutex::new(Session::from_keys(keys)));
        let mut devices = self.devices.lock().map_err(|_| SessionError::Poisoned)?;
        Ok(devices.entry(device.clone()).or_insert(loaded).clone())
    }
}

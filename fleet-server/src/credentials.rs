//! The MQTT connect-time check: an in-memory cache of every device's
//! password hash and status, so rumqttd's listener thread never waits for
//! the database.
//!
//! Filled from the store at start and kept current by provisioning (a new
//! device) and revocation (a revoked one is refused from that moment on).
//! Unprovisioned traps connect as [`PROVISION_USERNAME`] with the fleet's
//! provisioning password and may only claim: ingest ignores anything they
//! publish on device topics, because none of it opens under a device key.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::broker::Authenticator;
use crate::store::{DeviceStatus, PasswordHash, constant_time_eq};

/// Username of unprovisioned traps.
pub const PROVISION_USERNAME: &str = "provision";

#[derive(Debug, Clone)]
struct Entry {
    hash: PasswordHash,
    active: bool,
}

/// Device credentials for the broker's authenticator.
#[derive(Debug, Clone)]
pub struct CredentialCache {
    devices: Arc<RwLock<HashMap<String, Entry>>>,
    provision_password: Option<Arc<PasswordHash>>,
}

impl CredentialCache {
    /// An empty cache; `provision_password` admits unprovisioned traps (none
    /// when `None`: then only the factory-provisioned can connect).
    pub fn new(provision_password: Option<&str>) -> Self {
        Self {
            devices: Arc::default(),
            provision_password: provision_password.map(|p| Arc::new(PasswordHash::of(p))),
        }
    }

    /// Adds or replaces a device.
    pub fn upsert(&self, device_id: &str, hash: PasswordHash, status: DeviceStatus) {
        let entry = Entry { hash, active: status == DeviceStatus::Active };
        if let Ok(mut devices) = self.devices.write() {
            devices.insert(device_id.to_string(), entry);
        }
    }

    /// Refuses the device from now on.
    pub fn revoke(&self, device_id: &str) {
        if let Ok(mut devices) = self.devices.write()
            && let Some(entry) = devices.get_mut(device_id)
        {
            entry.active = false;
        }
    }

    /// Devices known to the cache.
    pub fn len(&self) -> usize {
        self.devices.read().map(|d| d.len()).unwrap_or(0)
    }

    /// Whether the cache knows no device.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_device(&self, device_id: &str, password: &str) -> bool {
        let Ok(devices) = self.devices.read() else {
            return false;
        };
        devices
            .get(device_id)
            .is_some_and(|entry| entry.active && entry.hash.verify(password))
    }

    fn check_provisioning(&self, password: &str) -> bool {
        self.provision_password
            .as_ref()
            .is_some_and(|hash| constant_time_eq(PasswordHash::of(password).as_bytes(), hash.as_bytes()))
    }
}

impl Authenticator for CredentialCache {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        if username == PROVISION_USERNAME {
            // Any client id: provisioning sessions are told apart by topic.
            return client_id != username && self.check_provisioning(password);
        }
        // A device connects as itself: rumqttd drops an existing connection
        // when another presents the same client id.
        client_id == username && self.check_device(username, password)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_connect_as_themselves_until_revoked() {
        let cache = CredentialCache::new(Some("fleet-provisioning"));
        cache.upsert("trap-1", PasswordHash::of("secret-1"), DeviceStatus::Active);
        assert!(cache.authenticate("trap-1", "trap-1", "secret-1"));
        assert!(!cache.authenticate("trap-1", "trap-1", "secret-2"));
        assert!(!cache.authenticate("trap-2", "trap-1", "secret-1"), "client id must be the username");
        assert!(!cache.authenticate("trap-9", "trap-9", "secret-1"), "unknown device");
        cache.revoke("trap-1");
        assert!(!cache.authenticate("trap-1", "trap-1", "secret-1"), "revoked");
    }

    #[test]
    fn provisioning_account() {
        let cache = CredentialCache::new(Some("fleet-provisioning"));
        assert!(cache.authenticate("unclaimed-abc", PROVISION_USERNAME, "fleet-provisioning"));
        assert!(!cache.authenticate("unclaimed-abc", PROVISION_USERNAME, "guess"));
        assert!(!CredentialCache::new(None).authenticate("x", PROVISION_USERNAME, ""));
    }
}

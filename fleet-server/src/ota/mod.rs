//! Firmware updates, server side: uploaded images (checked against the
//! configured signing keys and stored content-addressed), rollouts, and the
//! delivery to devices over MQTT.
//!
//! - [`artifact`]: the upload checks (manifest header, signature, size,
//!   SHA-256) and the image files under `<data_dir>/firmware/`.
//! - [`cache`]: the few images being served, in memory.
//! - [`service`]: [`Ota`], the handle ingest, the hello catch-up and the API
//!   use: offers on hello and when a rollout starts or resumes, a bounded
//!   queue of OTA uplinks served by its own task (chunks from the cache,
//!   progress and results recorded in the store).
//!
//! The device side is the SDK's `OtaMachine`; see `docs/protocol.md`, OTA.

pub mod artifact;
mod cache;
mod encoding;
mod service;

pub use artifact::{ImageFiles, UploadError};
pub use encoding::{base64_decode, base64_encode, pem_public_key, signing_key};
pub use service::{MANIFEST_HEADER, Ota, OtaSettings};

//! `/firmware` and `/rollouts`: uploaded images and their rollouts.
//!
//! An upload is the raw image as the body (`application/octet-stream`) and
//! the signed manifest (standard base64 of the file `cargo xtask sign`
//! writes) in the `X-WildCAM-Manifest` header. It is checked before anything
//! is stored: the manifest decodes, its signature verifies under a
//! configured key, the image is within the size limit and matches the
//! manifest's size and SHA-256. The same image again returns the stored
//! firmware (200 instead of 201).

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

use super::ApiError;
use super::extract::{JsonBody, PageParams, PathParams, QueryParams, parse_device_id, to_hex};
use super::views::PageView;
use crate::ota::artifact::{check_announced_size, check_image, parse_manifest_header, verify_signature};
use crate::ota::{MANIFEST_HEADER, UploadError};
use crate::server::AppState;
use crate::store::{
    FirmwareRecord, NewRollout, RolloutAction, RolloutDevice, RolloutRecord, RolloutState, TargetState,
};

/// A stored firmware image.
#[derive(Debug, Serialize)]
pub struct FirmwareView {
    id: u32,
    sha256: String,
    size: u32,
    chip: Chip,
    version: FirmwareVersion,
    secure_version: u32,
    min_battery_mv: u16,
    signing_key: String,
    created_at_ms: i64,
}

impl From<FirmwareRecord> for FirmwareView {
    fn from(f: FirmwareRecord) -> Self {
        Self {
            id: f.id,
            sha256: to_hex(&f.sha256),
            size: f.size,
            chip: f.chip,
            version: f.version,
            secure_version: f.secure_version,
            min_battery_mv: f.min_battery_mv,
            signing_key: to_hex(&f.signing_key),
            created_at_ms: f.created_at_ms,
        }
    }
}

/// Answer of `POST /firmware`.
#[derive(Debug, Serialize)]
pub struct FirmwareUpload {
    firmware: FirmwareView,
    /// `false`: the same image was stored already.
    created: bool,
}

impl From<UploadError> for ApiError {
    fn from(error: UploadError) -> Self {
        let message = error.to_string();
        match error {
            UploadError::ManifestMissing(_) => Self::bad_request("manifest_missing", message),
            UploadError::ManifestInvalid(_) => Self::bad_request("manifest_invalid", message),
            UploadError::NoSigningKey => Self::conflict("no_signing_key", message),
            UploadError::SignatureInvalid(_) => Self::unprocessable("signature_invalid", message),
            UploadError::TooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", message)
            }
            UploadError::SizeMismatch { .. } => Self::unprocessable("image_size_mismatch", message),
            UploadError::DigestMismatch { .. } => Self::unprocessable("image_digest_mismatch", message),
        }
    }
}

/// `POST /firmware`: checks and stores an image.
pub async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<FirmwareUpload>), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type.is_none_or(|t| !t.trim().eq_ignore_ascii_case("application/octet-stream")) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the image must be sent as application/octet-stream",
        ));
    }
    let header = headers
        .get(MANIFEST_HEADER)
        .ok_or(UploadError::ManifestMissing(MANIFEST_HEADER))?;
    let header = header
        .to_str()
        .map_err(|_| UploadError::ManifestInvalid("the manifest header is not text".into()))?;
    let manifest = parse_manifest_header(header)?;
    let settings = state.ota.settings();
    let key = verify_signature(&manifest, &settings.signing_keys)?;
    let max = settings.max_image_bytes;
    check_announced_size(&manifest, max)?;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(size) = announced.filter(|&size| size > u64::from(max)) {
        return Err(UploadError::TooLarge { size, max }.into());
    }
    let image = axum::body::to_bytes(body, max as usize)
        .await
        .map_err(|_| UploadError::TooLarge { size: u64::from(max) + 1, max })?;
    check_image(&manifest, &image)?;
    let (firmware, created) = state.ota.store_firmware(manifest, key, image).await?;
    if created {
        tracing::info!(firmware = firmware.id, version = ?firmware.version, chip = ?firmware.chip, "firmware uploaded");
    }
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(FirmwareUpload { firmware: firmware.into(), created })))
}

/// `GET /firmware`: newest first.
pub async fn list_firmware(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<PageView<FirmwareView>>, ApiError> {
    let page = state.store.list_firmware(params.request()?).await?;
    Ok(Json(PageView::map(page, FirmwareView::from)))
}

/// `GET /firmware/{id}`.
pub async fn get_firmware(
    State(state): State<AppState>,
    PathParams(id): PathParams<u32>,
) -> Result<Json<FirmwareView>, ApiError> {
    let firmware = state
        .store
        .get_firmware(id)
        .await?
        .ok_or(crate::store::StoreError::FirmwareNotFound(id))?;
    Ok(Json(firmware.into()))
}

/// A rollout without its per-device rows.
#[derive(Debug, Serialize)]
pub struct RolloutView {
    id: u32,
    firmware_id: u32,
    version: FirmwareVersion,
    chip: Chip,
    state: RolloutState,
    pause_reason: Option<String>,
    max_in_flight: u32,
    failure_threshold: u32,
    /// Targets per state (every state present).
    counts: BTreeMap<&'static str, u32>,
    created_at_ms: i64,
    updated_at_ms: i64,
}

impl From<RolloutRecord> for RolloutView {
    fn from(r: RolloutRecord) -> Self {
        Self {
            id: r.id,
            firmware_id: r.firmware.id,
            version: r.firmware.version,
            chip: r.firmware.chip,
            state: r.state,
            pause_reason: r.pause_reason,
            max_in_flight: r.max_in_flight,
            failure_threshold: r.failure_threshold,
            counts: r.counts.iter().map(|(s, n)| (s.as_str(), *n)).collect(),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }
}

/// One target of a rollout.
#[derive(Debug, Serialize)]
pub struct RolloutDeviceView {
    device_id: String,
    state: TargetState,
    offset: u32,
    /// The device's reported outcome (an `OtaOutcome` name), once any.
    outcome: Option<String>,
    offers: u32,
    updated_at_ms: i64,
}

impl From<RolloutDevice> for RolloutDeviceView {
    fn from(d: RolloutDevice) -> Self {
        Self {
            device_id: d.device_id.as_str().to_owned(),
            state: d.state,
            offset: d.offset,
            outcome: d.outcome.map(|o| format!("{o:?}")),
            offers: d.offers,
            updated_at_ms: d.updated_at_ms,
        }
    }
}

/// A rollout with every target.
#[derive(Debug, Serialize)]
pub struct RolloutDetailView {
    #[serde(flatten)]
    rollout: RolloutView,
    devices: Vec<RolloutDeviceView>,
}

/// Body of `POST /rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRolloutBody {
    firmware_id: u32,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    all: bool,
    max_in_flight: Option<u32>,
    failure_threshold: Option<u32>,
}

/// `POST /rollouts`: creates a rollout and offers it to the first targets.
pub async fn create_rollout(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewRolloutBody>,
) -> Result<(StatusCode, Json<RolloutDetailView>), ApiError> {
    let devices = body
        .devices
        .iter()
        .map(|d| parse_device_id(d))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = state.ota.settings();
    let new = NewRollout {
        firmware_id: body.firmware_id,
        devices,
        all_of_chip: body.all,
        max_in_flight: body.max_in_flight.unwrap_or(settings.max_in_flight),
        failure_threshold: body.failure_threshold.unwrap_or(settings.failure_threshold),
    };
    let rollout = state.store.create_rollout(new).await?;
    // Targets of older rollouts may have been superseded.
    state.ota.forget_grants();
    tracing::info!(rollout = rollout.id, firmware = rollout.firmware.id, "rollout created");
    state.ota.kick(rollout.id).await;
    Ok((StatusCode::CREATED, Json(detail(&state, rollout.id).await?)))
}

async fn detail(state: &AppState, id: u32) -> Result<RolloutDetailView, ApiError> {
    let rollout = state
        .store
        .get_rollout(id)
        .await?
        .ok_or(crate::store::StoreError::RolloutNotFound(id))?;
    let devices = state.store.rollout_devices(id).await?;
    Ok(RolloutDetailView { rollout: rollout.into(), devices: devices.into_iter().map(Into::into).collect() })
}

/// `GET /rollouts`: newest first.
pub async fn list_rollouts(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<PageView<RolloutView>>, ApiError> {
    let page = state.store.list_rollouts(params.request()?).await?;
    Ok(Json(PageView::map(page, RolloutView::from)))
}

/// `GET /rollouts/{id}`: counts and every target.
pub async fn get_rollout(
    State(state): State<AppState>,
    PathParams(id): PathParams<u32>,
) -> Result<Json<RolloutDetailView>, ApiError> {
    Ok(Json(detail(&state, id).await?))
}

async fn change(state: &AppState, id: u32, action: RolloutAction) -> Result<Json<RolloutView>, ApiError> {
    let rollout = state.store.change_rollout(id, action).await?;
    state.ota.forget_grants();
    tracing::info!(rollout = id, ?action, "rollout changed");
    if action == RolloutAction::Resume {
        state.ota.kick(id).await;
    }
    let rollout = state.store.get_rollout(id).await?.unwrap_or(rollout);
    Ok(Json(rollout.into()))
}

/// `POST /rollouts/{id}/pause`: no new offers; downloads in progress go on.
pub async fn pause(
    State(state): State<AppState>,
    PathParams(id): PathParams<u32>,
) -> Result<Json<RolloutView>, ApiError> {
    change(&state, id, RolloutAction::Pause).await
}

/// `POST /rollouts/{id}/resume`: offers again.
pub async fn resume(
    State(state): State<AppState>,
    PathParams(id): PathParams<u32>,
) -> Result<Json<RolloutView>, ApiError> {
    change(&state, id, RolloutAction::Resume).await
}

/// `POST /rollouts/{id}/abort`: ends the rollout; devices still downloading
/// get an empty chunk (they fail it as a size mismatch).
pub async fn abort(
    State(state): State<AppState>,
    PathParams(id): PathParams<u32>,
) -> Result<Json<RolloutView>, ApiError> {
    change(&state, id, RolloutAction::Abort).await
}

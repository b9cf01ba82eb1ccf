//! `/devices/{id}/config` and `/devices/{id}/commands`: what operators ask
//! of a trap. Both are stored first, then published at once; a trap that is
//! asleep gets them on its next hello (`Downlink::catch_up`), so a failed
//! publish is reported, not an error.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    BURST_LEN_MAX, CHECKIN_INTERVAL_MAX_S, CHECKIN_INTERVAL_MIN_S, CommandKind, MINUTES_PER_DAY, TrapConfig,
};

use super::ApiError;
use super::devices::existing_device;
use super::extract::{DevicePath, JsonBody, PageParams, QueryParams};
use super::views::{CommandView, DesiredConfigView, DeviceConfigView, PageView};
use crate::server::AppState;
use crate::store::{CommandRecord, PageRequest};

/// Time-to-live of a command when the request names none: 1 hour.
pub const COMMAND_TTL_DEFAULT_S: u32 = 3_600;

/// `GET /devices/{id}/config`: desired and reported configuration.
pub async fn get_config(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
) -> Result<Json<DeviceConfigView>, ApiError> {
    let device = existing_device(&state, &id).await?;
    Ok(Json(DeviceConfigView {
        desired: device.desired_config.map(Into::into),
        reported: device.reported_config.map(Into::into),
    }))
}

/// Answer of `PUT /devices/{id}/config`.
#[derive(Debug, Serialize)]
pub struct ConfigUpdate {
    desired: DesiredConfigView,
    /// Whether it was published on the trap's downlink topic now (a connected
    /// trap receives it at once; every trap gets it on its next hello).
    published: bool,
}

/// `PUT /devices/{id}/config`: validates (422 with the reason), stores a new
/// desired version, and publishes it to the trap.
pub async fn set_config(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    JsonBody(config): JsonBody<TrapConfig>,
) -> Result<Json<ConfigUpdate>, ApiError> {
    if config.validate().is_err() {
        return Err(ApiError::unprocessable("invalid_config", config_problem(&config)));
    }
    let desired = state.store.set_desired_config(id.clone(), config).await?;
    let published = report_delivery(&id, "desired config", state.downlink.send(&id, &desired).await);
    Ok(Json(ConfigUpdate { desired: desired.into(), published }))
}

/// Which field of a configuration `TrapConfig::validate` refused, in words.
fn config_problem(config: &TrapConfig) -> String {
    if config.pir_sensitivity_pct > 100 {
        return "pir_sensitivity_pct must be within 0..=100".into();
    }
    if !(1..=BURST_LEN_MAX).contains(&config.burst_len) {
        return format!("burst_len must be within 1..={BURST_LEN_MAX}");
    }
    if config
        .capture_windows
        .iter()
        .any(|w| w.start_min >= MINUTES_PER_DAY || w.end_min >= MINUTES_PER_DAY)
    {
        return format!("capture window minutes must be below {MINUTES_PER_DAY}");
    }
    if !(CHECKIN_INTERVAL_MIN_S..=CHECKIN_INTERVAL_MAX_S).contains(&config.checkin_interval_s) {
        return format!(
            "checkin_interval_s must be within {CHECKIN_INTERVAL_MIN_S}..={CHECKIN_INTERVAL_MAX_S}"
        );
    }
    "a configuration field is out of its documented range".into()
}

/// Logs a failed publish and tells whether it went out.
fn report_delivery<E: std::fmt::Display>(id: &DeviceId, what: &str, result: Result<(), E>) -> bool {
    match result {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(device = id.as_str(), %error, "{what} stored but not published; sent on next hello");
            false
        }
    }
}

/// The command names of the API.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KindName {
    Reboot,
    CaptureNow,
    FormatStorage,
    SendFullImage,
}

/// Body of `POST /devices/{id}/commands`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommandBody {
    kind: KindName,
    /// Sequence of the detection, for `send_full_image` only.
    seq: Option<u32>,
    ttl_s: Option<u32>,
}

impl NewCommandBody {
    /// The SDK's command kind, or a 422 when `seq` is missing or superfluous.
    fn command_kind(&self) -> Result<CommandKind, ApiError> {
        let kind = match (self.kind, self.seq) {
            (KindName::SendFullImage, Some(seq)) => CommandKind::SendFullImage { seq },
            (KindName::SendFullImage, None) => {
                return Err(ApiError::unprocessable("invalid_value", "send_full_image needs seq"));
            }
            (_, Some(_)) => {
                return Err(ApiError::unprocessable("invalid_value", "only send_full_image takes seq"));
            }
            (KindName::Reboot, None) => CommandKind::Reboot,
            (KindName::CaptureNow, None) => CommandKind::CaptureNow,
            (KindName::FormatStorage, None) => CommandKind::FormatStorage,
        };
        Ok(kind)
    }
}

/// Answer of `POST /devices/{id}/commands`.
#[derive(Debug, Serialize)]
pub struct QueuedCommand {
    command: CommandView,
    /// Whether the device's open commands were published on its downlink
    /// topic now (a connected trap receives them at once; every trap gets
    /// them on its next hello).
    published: bool,
}

/// `POST /devices/{id}/commands`: queues a command and publishes the
/// device's open commands.
pub async fn send_command(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    JsonBody(body): JsonBody<NewCommandBody>,
) -> Result<(StatusCode, Json<QueuedCommand>), ApiError> {
    let kind = body.command_kind()?;
    let ttl_s = body.ttl_s.unwrap_or(COMMAND_TTL_DEFAULT_S);
    let queued = state.store.enqueue_command(id.clone(), kind, ttl_s).await?;
    let published = report_delivery(&id, "command", state.downlink.deliver_commands(&id).await);
    let command = latest_state(&state, queued).await?;
    Ok((StatusCode::CREATED, Json(QueuedCommand { command: command.into(), published })))
}

/// The command as stored now (delivery may have changed its state).
async fn latest_state(state: &AppState, queued: CommandRecord) -> Result<CommandRecord, ApiError> {
    let newest = state
        .store
        .list_commands(queued.device_id.clone(), PageRequest::first(1))
        .await?;
    Ok(newest
        .items
        .into_iter()
        .find(|record| record.id == queued.id)
        .unwrap_or(queued))
}

/// `GET /devices/{id}/commands`: newest first.
pub async fn list_commands(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<PageView<CommandView>>, ApiError> {
    let page = params.request()?;
    existing_device(&state, &id).await?;
    let commands = state.store.list_commands(id, page).await?;
    Ok(Json(PageView::map(commands, CommandView::from)))
}

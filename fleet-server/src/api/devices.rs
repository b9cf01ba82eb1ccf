//! `/devices`: the registry, labels, deployment and revocation.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use wildcam_sdk::DeviceId;

use super::ApiError;
use super::extract::{DevicePath, JsonBody, QueryParams, page_request, seconds_to_ms};
use super::views::{DeviceView, PageView};
use crate::server::{self, AppState};
use crate::store::{Deployment, Device, DeviceQuery, DeviceStatus};

/// Query of `GET /devices`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<StatusParam>,
    group: Option<String>,
    tag: Option<String>,
    site: Option<String>,
    /// Unix seconds.
    seen_since: Option<u32>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// A device status as a query parameter.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StatusParam {
    Active,
    Revoked,
}

impl From<StatusParam> for DeviceStatus {
    fn from(status: StatusParam) -> Self {
        match status {
            StatusParam::Active => DeviceStatus::Active,
            StatusParam::Revoked => DeviceStatus::Revoked,
        }
    }
}

/// `GET /devices`: devices matching every given filter, ordered by id.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<PageView<DeviceView>>, ApiError> {
    let query = DeviceQuery {
        status: params.status.map(DeviceStatus::from),
        group: params.group,
        tag: params.tag,
        site: params.site,
        seen_since_ms: params.seen_since.map(seconds_to_ms),
        page: page_request(params.limit, params.cursor)?,
    };
    let page = state.store.list_devices(query).await?;
    Ok(Json(PageView::map(page, DeviceView::from)))
}

/// `GET /devices/{id}`.
pub async fn get(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
) -> Result<Json<DeviceView>, ApiError> {
    Ok(Json(existing_device(&state, &id).await?.into()))
}

/// The device, or a 404.
pub async fn existing_device(state: &AppState, id: &DeviceId) -> Result<Device, ApiError> {
    state
        .store
        .get_device(id.clone())
        .await?
        .ok_or_else(|| ApiError::not_found("device_not_found", format!("device {id} not found")))
}

/// Body of `PUT /devices/{id}/tags`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    tags: Vec<String>,
}

/// `PUT /devices/{id}/tags`: replaces the device's tags.
pub async fn set_tags(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    JsonBody(body): JsonBody<TagsBody>,
) -> Result<Json<DeviceView>, ApiError> {
    state.store.set_tags(id.clone(), body.tags).await?;
    get(State(state), DevicePath(id)).await
}

/// Body of `PUT /devices/{id}/groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsBody {
    groups: Vec<String>,
}

/// `PUT /devices/{id}/groups`: replaces the device's groups.
pub async fn set_groups(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    JsonBody(body): JsonBody<GroupsBody>,
) -> Result<Json<DeviceView>, ApiError> {
    state.store.set_groups(id.clone(), body.groups).await?;
    get(State(state), DevicePath(id)).await
}

/// Body of `PUT /devices/{id}/deployment` (`null` clears it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentBody {
    site: String,
    latitude: Option<f64>,
    longitude: Option<f64>,
    camera_height_m: Option<f64>,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
}

impl From<DeploymentBody> for Deployment {
    fn from(body: DeploymentBody) -> Self {
        Deployment {
            site: body.site,
            latitude: body.latitude,
            longitude: body.longitude,
            camera_height_m: body.camera_height_m,
            start_ms: body.start_ms,
            end_ms: body.end_ms,
        }
    }
}

/// `PUT /devices/{id}/deployment`: sets where the device is, or clears it.
pub async fn set_deployment(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    JsonBody(body): JsonBody<Option<DeploymentBody>>,
) -> Result<Json<DeviceView>, ApiError> {
    state
        .store
        .set_deployment(id.clone(), body.map(Deployment::from))
        .await?;
    get(State(state), DevicePath(id)).await
}

/// `POST /devices/{id}/revoke`: refused by the broker and ingest at once.
pub async fn revoke(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
) -> Result<Json<DeviceView>, ApiError> {
    server::revoke_device(&state, &id).await?;
    get(State(state), DevicePath(id)).await
}

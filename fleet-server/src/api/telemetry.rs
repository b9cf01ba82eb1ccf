//! `/detections` and `/devices/{id}/health`: what the traps reported.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;

use super::ApiError;
use super::devices::existing_device;
use super::extract::{DevicePath, QueryParams, page_request, parse_device_id};
use super::views::{DetectionView, PageView};
use crate::server::AppState;
use crate::store::{DetectionQuery, HealthQuery, StoredHealth};

/// Result order by capture (or report) time.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Oldest first (the default).
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

/// Query of `GET /detections`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionParams {
    device: Option<String>,
    /// Captured at or after, Unix seconds.
    from: Option<u32>,
    /// Captured before, Unix seconds (exclusive).
    until: Option<u32>,
    label: Option<u16>,
    min_confidence: Option<u8>,
    #[serde(default)]
    order: Order,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /detections`: ordered by (capture time, device, sequence).
pub async fn detections(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<DetectionParams>,
) -> Result<Json<PageView<DetectionView>>, ApiError> {
    if params.min_confidence.is_some_and(|pct| pct > 100) {
        return Err(ApiError::bad_request("invalid_query", "min_confidence must be within 0..=100"));
    }
    let query = DetectionQuery {
        device_id: params.device.as_deref().map(parse_device_id).transpose()?,
        captured_from_s: params.from,
        captured_until_s: params.until,
        label: params.label,
        min_confidence_pct: params.min_confidence,
        newest_first: matches!(params.order, Order::Desc),
        page: page_request(params.limit, params.cursor)?,
    };
    let page = state.store.query_detections(query).await?;
    Ok(Json(PageView::map(page, DetectionView::from)))
}

/// Query of `GET /devices/{id}/health`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthParams {
    /// Taken at or after, Unix seconds.
    from: Option<u32>,
    /// Taken before, Unix seconds (exclusive).
    until: Option<u32>,
    #[serde(default)]
    order: Order,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /devices/{id}/health`: the device's health reports by time taken.
pub async fn health(
    State(state): State<AppState>,
    DevicePath(id): DevicePath,
    QueryParams(params): QueryParams<HealthParams>,
) -> Result<Json<PageView<StoredHealth>>, ApiError> {
    let page = page_request(params.limit, params.cursor)?;
    existing_device(&state, &id).await?;
    let query = HealthQuery {
        device_id: id,
        taken_from_s: params.from,
        taken_until_s: params.until,
        newest_first: matches!(params.order, Order::Desc),
        page,
    };
    let page = state.store.health_history(query).await?;
    Ok(Json(PageView::map(page, |health| health)))
}

//! The operator HTTP API, mounted under [`PREFIX`] (`/api/v1`): JSON in and
//! out, bearer-token authentication, one error shape, and an OpenAPI 3.1
//! document at `/api/v1/openapi.json` that describes every route.
//!
//! | area | routes | file |
//! |---|---|---|
//! | registry | `/devices`, `/devices/{id}`, tags, groups, deployment, revoke | `devices.rs` |
//! | claiming | `/claim-tokens`, `/allowlist` | `claims.rs` |
//! | telemetry | `/detections`, `/devices/{id}/health` | `telemetry.rs` |
//! | control | `/devices/{id}/config`, `/devices/{id}/commands` | `control.rs` |
//! | firmware updates | `/firmware`, `/rollouts` | `ota.rs` |
//! | server | `/server`, `/tokens` | `admin.rs` |
//!
//! Every route is registered through [`routes`] with the [`Access`] it needs,
//! which also yields the list of what is served: the tests compare it with
//! the OpenAPI document in both directions.

mod admin;
mod auth;
mod claims;
mod control;
mod devices;
mod error;
mod extract;
mod openapi;
mod ota;
mod telemetry;
mod views;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::from_fn_with_state;
use axum::routing::{MethodFilter, on};

pub use auth::Access;
pub use error::ApiError;
pub use extract::{parse_key_hex, to_hex};
pub use openapi::document;

use crate::server::AppState;

/// Where the API is mounted.
pub const PREFIX: &str = "/api/v1";
/// Largest request body accepted, bytes.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

impl Verb {
    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Verb::Get => Method::GET,
            Verb::Post => Method::POST,
            Verb::Put => Method::PUT,
            Verb::Delete => Method::DELETE,
        }
    }

    /// The lowercase name OpenAPI uses as the operation key.
    pub fn openapi_key(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// A route the API serves (path relative to [`PREFIX`], axum syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedRoute {
    /// The method.
    pub verb: Verb,
    /// The path, e.g. `/devices/{id}`.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

/// The API router, to nest under [`PREFIX`].
pub fn router(state: AppState) -> Router<AppState> {
    routes(state).0
}

/// The API router and the list of every route it serves.
pub fn routes(state: AppState) -> (Router<AppState>, Vec<ServedRoute>) {
    use Access::{Admin, Public, Read};
    use Verb::{Delete, Get, Post, Put};
    RouteTable::new(state)
        .add(Get, "/openapi.json", Public, openapi::serve)
        .add(Get, "/server", Read, admin::server_info)
        .add(Get, "/devices", Read, devices::list)
        .add(Get, "/devices/{id}", Read, devices::get)
        .add(Put, "/devices/{id}/tags", Admin, devices::set_tags)
        .add(Put, "/devices/{id}/groups", Admin, devices::set_groups)
        .add(Put, "/devices/{id}/deployment", Admin, devices::set_deployment)
        .add(Post, "/devices/{id}/revoke", Admin, devices::revoke)
        .add(Get, "/devices/{id}/health", Read, telemetry::health)
        .add(Get, "/devices/{id}/config", Read, control::get_config)
        .add(Put, "/devices/{id}/config", Admin, control::set_config)
        .add(Get, "/devices/{id}/commands", Read, control::list_commands)
        .add(Post, "/devices/{id}/commands", Admin, control::send_command)
        .add(Get, "/detections", Read, telemetry::detections)
        .add(Get, "/claim-tokens", Read, claims::list)
        .add(Post, "/claim-tokens", Admin, claims::create)
        .add(Post, "/claim-tokens/{id}/revoke", Admin, claims::revoke)
        .add(Get, "/allowlist", Read, claims::list_allowed)
        .add(Post, "/allowlist", Admin, claims::allow)
        .add(Delete, "/allowlist/{identity_key}", Admin, claims::disallow)
        .add_raw_body(Post, "/firmware", Admin, ota::upload)
        .add(Get, "/firmware", Read, ota::list_firmware)
        .add(Get, "/firmware/{id}", Read, ota::get_firmware)
        .add(Post, "/rollouts", Admin, ota::create_rollout)
        .add(Get, "/rollouts", Read, ota::list_rollouts)
        .add(Get, "/rollouts/{id}", Read, ota::get_rollout)
        .add(Post, "/rollouts/{id}/pause", Admin, ota::pause)
        .add(Post, "/rollouts/{id}/resume", Admin, ota::resume)
        .add(Post, "/rollouts/{id}/abort", Admin, ota::abort)
        .add(Get, "/tokens", Admin, admin::list_tokens)
        .add(Post, "/tokens", Admin, admin::create_token)
        .add(Post, "/tokens/{id}/revoke", Admin, admin::revoke_token)
        .finish()
}

/// Builds the router one route at a time, recording each.
struct RouteTable {
    state: AppState,
    router: Router<AppState>,
    served: Vec<ServedRoute>,
}

impl RouteTable {
    fn new(state: AppState) -> Self {
        Self { state, router: Router::new(), served: Vec::new() }
    }

    /// Serves `handler` at `verb path`, behind the token check `access` needs.
    fn add<H, T>(self, verb: Verb, path: &'static str, access: Access, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add_route(verb, path, access, on(verb.filter(), handler))
    }

    /// [`RouteTable::add`] for a handler that reads the raw body under its own
    /// limit (firmware uploads), instead of [`BODY_LIMIT_BYTES`].
    fn add_raw_body<H, T>(self, verb: Verb, path: &'static str, access: Access, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let route = on(verb.filter(), handler).layer(DefaultBodyLimit::disable());
        self.add_route(verb, path, access, route)
    }

    fn add_route(
        mut self,
        verb: Verb,
        path: &'static str,
        access: Access,
        mut route: axum::routing::MethodRouter<AppState>,
    ) -> Self {
        if let Some(required) = access.required_role() {
            let gate = auth::Gate { state: self.state.clone(), required };
            route = route.route_layer(from_fn_with_state(gate, auth::authorize));
        }
        self.router = self.router.route(path, route);
        self.served.push(ServedRoute { verb, path, access });
        self
    }

    /// JSON errors for unknown routes and methods, and the body limit.
    fn finish(self) -> (Router<AppState>, Vec<ServedRoute>) {
        let router = self
            .router
            .method_not_allowed_fallback(method_not_allowed)
            .fallback(route_not_found)
            .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES));
        (router, self.served)
    }
}

async fn route_not_found() -> ApiError {
    ApiError::route_not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

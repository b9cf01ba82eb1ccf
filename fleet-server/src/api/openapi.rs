//! The OpenAPI 3.1 document of the operator API, written by hand as JSON
//! built in Rust (no code generator): `paths` per area, then `components`.
//!
//! It must stay true: `tests/api.rs` checks that every served route is
//! documented and every documented route is served, that path parameters
//! are declared, that every `$ref` resolves, and that real responses carry
//! exactly the documented properties.

use axum::Json;
use serde_json::{Map, Value, json};

use super::Access;
use super::claims::{CLAIM_TOKEN_LIFETIME_DEFAULT_S, CLAIM_TOKEN_LIFETIME_MAX_S};
use super::control::COMMAND_TTL_DEFAULT_S;
use super::extract::DEFAULT_PAGE_LIMIT;
use crate::config::{FAILURE_THRESHOLD_RANGE, MAX_IN_FLIGHT_RANGE};
use crate::ota::MANIFEST_HEADER;
use crate::store::{
    COMMAND_TTL_MAX_S, LABEL_LEN_MAX, LABELS_PER_DEVICE_MAX, PAGE_LIMIT_MAX, ROLLOUT_TARGETS_MAX, TargetState,
};

/// `GET /openapi.json` (no token needed).
pub async fn serve() -> Json<Value> {
    Json(document())
}

/// The whole document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "WildCAM fleet server operator API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": DESCRIPTION,
        },
        "servers": [{ "url": super::PREFIX }],
        "security": [{ "bearer": [] }],
        "paths": paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An operator API token (`wcat_...`), from `wildcam-fleet token create` or `POST /tokens`."
                }
            },
            "parameters": parameters(),
            "responses": error_responses(),
            "schemas": schemas(),
        }
    })
}

const DESCRIPTION: &str = "JSON in and out. Authenticate with `Authorization: Bearer <token>`: \
`read_only` tokens may call every `GET` route except `/tokens`; `admin` tokens may call everything. \
Errors are `{\"error\": {\"code\", \"message\"}}` with status 400 (malformed input), 401 (no, unknown or \
revoked token), 403 (role too low), 404, 409 (conflicts with the current state), 413 (body over 64 KiB), \
415 (body not JSON), 422 (a value out of range), 500 (details only in the server log). Lists are \
keyset-paginated: pass `next_cursor` back as `cursor` until it is `null`. Instants set by the server \
are Unix milliseconds (`_ms`); instants reported by traps and time filters are Unix seconds.";

// ---------------------------------------------------------------- helpers

/// `{"$ref": "#/components/schemas/{name}"}`.
fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A reusable parameter.
fn param(name: &str) -> Value {
    json!({ "$ref": format!("#/components/parameters/{name}") })
}

/// A query parameter.
fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

/// A path parameter.
fn path(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": schema })
}

/// A JSON request body.
fn body(schema: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema } } })
}

/// A page of `item` objects.
fn page_of(item: &str) -> Value {
    json!({
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": { "type": "array", "items": schema(item) },
            "next_cursor": { "type": ["string", "null"], "description": "Pass as `cursor` for the next page; `null` on the last page." }
        }
    })
}

/// One operation.
struct Op {
    summary: &'static str,
    access: Access,
    params: Vec<Value>,
    body: Option<Value>,
    status: u16,
    response: Option<Value>,
    errors: &'static [u16],
}

impl Op {
    fn new(access: Access, summary: &'static str) -> Self {
        Self { summary, access, params: Vec::new(), body: None, status: 200, response: None, errors: &[] }
    }

    fn params(mut self, params: Vec<Value>) -> Self {
        self.params = params;
        self
    }

    fn body(mut self, schema: Value) -> Self {
        self.body = Some(body(schema));
        self
    }

    fn returns(mut self, status: u16, schema: Value) -> Self {
        self.status = status;
        self.response = Some(schema);
        self
    }

    fn no_content(mut self) -> Self {
        self.status = 204;
        self
    }

    fn errors(mut self, errors: &'static [u16]) -> Self {
        self.errors = errors;
        self
    }

    fn build(self) -> Value {
        let mut op = json!({ "summary": self.summary, "description": access_note(self.access) });
        if self.access == Access::Public {
            op["security"] = json!([]);
        }
        if !self.params.is_empty() {
            op["parameters"] = Value::Array(self.params);
        }
        if let Some(body) = self.body {
            op["requestBody"] = body;
        }
        op["responses"] = responses(self.status, self.response, self.access, self.errors);
        op
    }
}

fn access_note(access: Access) -> &'static str {
    match access {
        Access::Public => "No token needed.",
        Access::Read => "Any valid token (`read_only` or `admin`).",
        Access::Admin => "An `admin` token.",
    }
}

fn responses(status: u16, response: Option<Value>, access: Access, errors: &[u16]) -> Value {
    let mut map = Map::new();
    let success = match response {
        Some(schema) => {
            json!({ "description": "Success.", "content": { "application/json": { "schema": schema } } })
        }
        None => json!({ "description": "Success, no body." }),
    };
    map.insert(status.to_string(), success);
    let auth: &[u16] = match access {
        Access::Public => &[],
        Access::Read => &[401],
        Access::Admin => &[401, 403],
    };
    for code in auth.iter().chain(errors).chain(&[500]) {
        map.insert(code.to_string(), json!({ "$ref": format!("#/components/responses/E{code}") }));
    }
    Value::Object(map)
}

fn add(paths: &mut Map<String, Value>, route: &str, method: &str, op: Op) {
    let entry = paths
        .entry(route.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    entry[method] = op.build();
}

// ---------------------------------------------------------------- paths

fn paths() -> Value {
    let mut paths = Map::new();
    server_paths(&mut paths);
    device_paths(&mut paths);
    control_paths(&mut paths);
    telemetry_paths(&mut paths);
    claim_paths(&mut paths);
    ota_paths(&mut paths);
    token_paths(&mut paths);
    Value::Object(paths)
}

fn server_paths(paths: &mut Map<String, Value>) {
    add(
        paths,
        "/openapi.json",
        "get",
        Op::new(Access::Public, "This document.").returns(200, json!({ "type": "object" })),
    );
    add(
        paths,
        "/server",
        "get",
        Op::new(Access::Read, "Server version, identity public key and MQTT listeners.")
            .returns(200, schema("ServerInfo")),
    );
}

fn device_paths(paths: &mut Map<String, Value>) {
    let filters = vec![
        query("status", "Only devices with this status.", schema("DeviceStatus")),
        query("group", "Only members of this group.", json!({ "type": "string" })),
        query("tag", "Only devices with this tag.", json!({ "type": "string" })),
        query("site", "Only devices deployed at this site.", json!({ "type": "string" })),
        query(
            "seen_since",
            "Only devices seen at or after this instant (Unix seconds).",
            json!({ "type": "integer", "minimum": 0 }),
        ),
        param("Limit"),
        param("Cursor"),
    ];
    add(
        paths,
        "/devices",
        "get",
        Op::new(Access::Read, "Devices matching every given filter, ordered by id.")
            .params(filters)
            .returns(200, schema("DevicePage"))
            .errors(&[400]),
    );
    add(
        paths,
        "/devices/{id}",
        "get",
        Op::new(Access::Read, "One device.")
            .params(vec![param("DeviceId")])
            .returns(200, schema("Device"))
            .errors(&[400, 404]),
    );
    let labels = [
        ("tags", "TagsInput", "Replaces the device's tags."),
        ("groups", "GroupsInput", "Replaces the device's groups."),
    ];
    for (name, input, summary) in labels {
        add(
            paths,
            &format!("/devices/{{id}}/{name}"),
            "put",
            Op::new(Access::Admin, summary)
                .params(vec![param("DeviceId")])
                .body(schema(input))
                .returns(200, schema("Device"))
                .errors(&[400, 404, 413, 415, 422]),
        );
    }
    add(
        paths,
        "/devices/{id}/deployment",
        "put",
        Op::new(Access::Admin, "Sets where the device is deployed; a `null` body clears it.")
            .params(vec![param("DeviceId")])
            .body(json!({ "oneOf": [schema("DeploymentInput"), { "type": "null" }] }))
            .returns(200, schema("Device"))
            .errors(&[400, 404, 413, 415, 422]),
    );
    add(
        paths,
        "/devices/{id}/revoke",
        "post",
        Op::new(Access::Admin, "Revokes the device: the broker and ingest refuse it at once. Revoking twice keeps the first time.")
            .params(vec![param("DeviceId")])
            .returns(200, schema("Device"))
            .errors(&[400, 404]),
    );
}

fn control_paths(paths: &mut Map<String, Value>) {
    add(
        paths,
        "/devices/{id}/config",
        "get",
        Op::new(Access::Read, "Desired and reported configuration.")
            .params(vec![param("DeviceId")])
            .returns(200, schema("DeviceConfig"))
            .errors(&[400, 404]),
    );
    add(
        paths,
        "/devices/{id}/config",
        "put",
        Op::new(
            Access::Admin,
            "Validates the configuration (422 with the reason), stores it as a new desired version and publishes it to the trap; a sleeping trap gets it on its next hello.",
        )
        .params(vec![param("DeviceId")])
        .body(schema("TrapConfig"))
        .returns(200, schema("ConfigUpdate"))
        .errors(&[400, 404, 409, 413, 415, 422]),
    );
    add(
        paths,
        "/devices/{id}/commands",
        "get",
        Op::new(Access::Read, "The device's commands, newest first.")
            .params(vec![param("DeviceId"), param("Limit"), param("Cursor")])
            .returns(200, schema("CommandPage"))
            .errors(&[400, 404]),
    );
    add(
        paths,
        "/devices/{id}/commands",
        "post",
        Op::new(Access::Admin, "Queues a command and publishes the device's open commands; a sleeping trap gets them on its next hello.")
            .params(vec![param("DeviceId")])
            .body(schema("NewCommand"))
            .returns(201, schema("QueuedCommand"))
            .errors(&[400, 404, 409, 413, 415, 422]),
    );
}

fn telemetry_paths(paths: &mut Map<String, Value>) {
    let filters = vec![
        query("device", "Only this device's detections.", json!({ "type": "string" })),
        query("from", "Captured at or after (Unix seconds).", json!({ "type": "integer", "minimum": 0 })),
        query(
            "until",
            "Captured before (Unix seconds, exclusive).",
            json!({ "type": "integer", "minimum": 0 }),
        ),
        query(
            "label",
            "Only detections with a classifier result of this label id.",
            json!({ "type": "integer", "minimum": 0, "maximum": 65535 }),
        ),
        query(
            "min_confidence",
            "Only detections with a result (of `label`, if given) of at least this confidence, percent.",
            json!({ "type": "integer", "minimum": 0, "maximum": 100 }),
        ),
        param("Order"),
        param("Limit"),
        param("Cursor"),
    ];
    add(
        paths,
        "/detections",
        "get",
        Op::new(
            Access::Read,
            "Detections matching every given filter, ordered by (capture time, device, sequence).",
        )
        .params(filters)
        .returns(200, schema("DetectionPage"))
        .errors(&[400]),
    );
    let health = vec![
        param("DeviceId"),
        query("from", "Taken at or after (Unix seconds).", json!({ "type": "integer", "minimum": 0 })),
        query("until", "Taken before (Unix seconds, exclusive).", json!({ "type": "integer", "minimum": 0 })),
        param("Order"),
        param("Limit"),
        param("Cursor"),
    ];
    add(
        paths,
        "/devices/{id}/health",
        "get",
        Op::new(Access::Read, "The device's health reports, by time taken.")
            .params(health)
            .returns(200, schema("HealthPage"))
            .errors(&[400, 404]),
    );
}

fn claim_paths(paths: &mut Map<String, Value>) {
    add(
        paths,
        "/claim-tokens",
        "get",
        Op::new(
            Access::Read,
            "Claim tokens ordered by id, revoked and used-up ones included (never their secret).",
        )
        .params(vec![param("Limit"), param("Cursor")])
        .returns(200, schema("ClaimTokenPage"))
        .errors(&[400]),
    );
    add(
        paths,
        "/claim-tokens",
        "post",
        Op::new(Access::Admin, "Creates a claim token; its text is in this answer and nowhere else.")
            .body(schema("NewClaimToken"))
            .returns(201, schema("CreatedClaimToken"))
            .errors(&[400, 413, 415, 422]),
    );
    add(
        paths,
        "/claim-tokens/{id}/revoke",
        "post",
        Op::new(Access::Admin, "Revokes a claim token: later claims with it fail.")
            .params(vec![path("id", "The claim token's public id.", json!({ "type": "string" }))])
            .returns(200, schema("ClaimToken"))
            .errors(&[400, 404]),
    );
    add(
        paths,
        "/allowlist",
        "get",
        Op::new(Access::Read, "The factory allow-list, ordered by key.")
            .params(vec![param("Limit"), param("Cursor")])
            .returns(200, schema("AllowedIdentityPage"))
            .errors(&[400]),
    );
    add(
        paths,
        "/allowlist",
        "post",
        Op::new(
            Access::Admin,
            "Adds an identity key to the allow-list (or updates its note): it may claim without a token.",
        )
        .body(schema("NewAllowedIdentity"))
        .returns(201, schema("AllowedIdentity"))
        .errors(&[400, 413, 415, 422]),
    );
    add(
        paths,
        "/allowlist/{identity_key}",
        "delete",
        Op::new(Access::Admin, "Removes an identity key from the allow-list.")
            .params(vec![path(
                "identity_key",
                "The ed25519 identity public key, 64 hex digits.",
                schema("HexKey"),
            )])
            .no_content()
            .errors(&[400, 404]),
    );
}

fn token_paths(paths: &mut Map<String, Value>) {
    add(
        paths,
        "/tokens",
        "get",
        Op::new(
            Access::Admin,
            "Operator API tokens ordered by id, revoked ones included (never the token text).",
        )
        .params(vec![param("Limit"), param("Cursor")])
        .returns(200, schema("ApiTokenPage"))
        .errors(&[400]),
    );
    add(
        paths,
        "/tokens",
        "post",
        Op::new(Access::Admin, "Creates an operator API token; its text is in this answer and nowhere else.")
            .body(schema("NewApiToken"))
            .returns(201, schema("CreatedApiToken"))
            .errors(&[400, 413, 415, 422]),
    );
    add(
        paths,
        "/tokens/{id}/revoke",
        "post",
        Op::new(Access::Admin, "Revokes an operator API token; it is refused from the next request on.")
            .params(vec![path("id", "The token's id.", json!({ "type": "integer" }))])
            .no_content()
            .errors(&[400, 404]),
    );
}

fn ota_paths(paths: &mut Map<String, Value>) {
    let mut upload = Op::new(
        Access::Admin,
        "Uploads a firmware image: the raw image as the body, the signed manifest (standard base64 of the file `cargo xtask sign` writes) in the `X-WildCAM-Manifest` header. Checked before anything is stored: the manifest decodes (400 `manifest_missing`, `manifest_invalid`), its signature verifies under a configured key (409 `no_signing_key`, 422 `signature_invalid`), the image is within `[ota] max_image_bytes` (413 `image_too_large`) and matches the manifest's size and SHA-256 (422 `image_size_mismatch`, `image_digest_mismatch`). The same image again returns the stored firmware with 200; the same SHA-256 with another manifest is 409 `firmware_conflict`.",
    )
    .params(vec![json!({
        "name": MANIFEST_HEADER, "in": "header", "required": true,
        "description": "Standard base64 of the postcard `SignedManifest` file.",
        "schema": { "type": "string" }
    })])
    .returns(201, schema("FirmwareUpload"))
    .errors(&[400, 409, 413, 415, 422])
    .build();
    upload["requestBody"] = json!({
        "required": true,
        "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } }
    });
    upload["responses"]["200"] = json!({
        "description": "The same image was stored already.",
        "content": { "application/json": { "schema": schema("FirmwareUpload") } }
    });
    paths
        .entry("/firmware".to_owned())
        .or_insert_with(|| Value::Object(Map::new()))["post"] = upload;
    add(
        paths,
        "/firmware",
        "get",
        Op::new(Access::Read, "Uploaded firmware, newest first.")
            .params(vec![param("Limit"), param("Cursor")])
            .returns(200, schema("FirmwarePage"))
            .errors(&[400]),
    );
    let id =
        |what: &str| path("id", &format!("The {what}'s id."), json!({ "type": "integer", "minimum": 1 }));
    add(
        paths,
        "/firmware/{id}",
        "get",
        Op::new(Access::Read, "One firmware.")
            .params(vec![id("firmware")])
            .returns(200, schema("Firmware"))
            .errors(&[400, 404]),
    );
    add(
        paths,
        "/rollouts",
        "post",
        Op::new(Access::Admin, "Creates a rollout of a firmware to the named devices and/or every active device of its chip running an older version, and offers it to the first `max_in_flight` of them. A target's unfinished targets in older rollouts become `superseded`.")
            .body(schema("NewRollout"))
            .returns(201, schema("RolloutDetail"))
            .errors(&[400, 404, 409, 413, 415, 422]),
    );
    add(
        paths,
        "/rollouts",
        "get",
        Op::new(Access::Read, "Rollouts, newest first, with counts per target state.")
            .params(vec![param("Limit"), param("Cursor")])
            .returns(200, schema("RolloutPage"))
            .errors(&[400]),
    );
    add(
        paths,
        "/rollouts/{id}",
        "get",
        Op::new(Access::Read, "One rollout: counts per state and every target.")
            .params(vec![id("rollout")])
            .returns(200, schema("RolloutDetail"))
            .errors(&[400, 404]),
    );
    let actions = [
        (
            "pause",
            "Stops new offers; downloads in progress continue. Pausing a paused rollout changes nothing.",
        ),
        ("resume", "Offers again (also after an automatic pause at the failure threshold)."),
        (
            "abort",
            "Ends the rollout for good: unfinished targets become `aborted`, devices still downloading get an empty chunk.",
        ),
    ];
    for (action, summary) in actions {
        add(
            paths,
            &format!("/rollouts/{{id}}/{action}"),
            "post",
            Op::new(Access::Admin, summary)
                .params(vec![id("rollout")])
                .returns(200, schema("Rollout"))
                .errors(&[400, 404, 409]),
        );
    }
}

// ---------------------------------------------------------------- components

fn parameters() -> Value {
    json!({
        "DeviceId": path("id", "The device id: 1 to 32 characters of `[A-Za-z0-9._-]`.", json!({ "type": "string", "pattern": "^[A-Za-z0-9._-]{1,32}$" })),
        "Limit": query("limit", &format!("Items per page, 1..={PAGE_LIMIT_MAX} (default {DEFAULT_PAGE_LIMIT})."), json!({ "type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": DEFAULT_PAGE_LIMIT })),
        "Cursor": query("cursor", "The `next_cursor` of the previous page (opaque; only valid for the same query).", json!({ "type": "string" })),
        "Order": query("order", "`asc`: oldest first (default); `desc`: newest first.", json!({ "type": "string", "enum": ["asc", "desc"], "default": "asc" })),
    })
}

fn error_responses() -> Value {
    let described = [
        (
            400,
            "Malformed parameter or body (`invalid_query`, `invalid_body`, `invalid_path`, `invalid_device_id`, `invalid_limit`, `invalid_cursor`, `manifest_missing`, `manifest_invalid`).",
        ),
        (401, "No, unknown or revoked token (`unauthorized`)."),
        (403, "The token's role does not allow this (`forbidden`)."),
        (
            404,
            "No such resource (`device_not_found`, `claim_token_not_found`, `api_token_not_found`, `identity_not_found`, `firmware_not_found`, `rollout_not_found`, `route_not_found`).",
        ),
        (
            409,
            "Conflicts with the current state (`device_revoked`, `too_many_open_commands`, `already_exists`, `no_signing_key`, `firmware_conflict`, `rollout_state`).",
        ),
        (
            413,
            "Request body over 64 KiB (`body_too_large`), or a firmware image over `[ota] max_image_bytes` (`image_too_large`).",
        ),
        (
            415,
            "Request body is not `application/json` (or, for firmware, `application/octet-stream`) (`unsupported_media_type`).",
        ),
        (
            422,
            "A value is out of its allowed range (`invalid_value`, `invalid_config`, `signature_invalid`, `image_size_mismatch`, `image_digest_mismatch`).",
        ),
        (500, "Internal failure; details are only in the server log (`internal`)."),
    ];
    let mut map = Map::new();
    for (code, description) in described {
        let response = json!({ "description": description, "content": { "application/json": { "schema": schema("Error") } } });
        map.insert(format!("E{code}"), response);
    }
    Value::Object(map)
}

fn schemas() -> Value {
    let mut map = Map::new();
    for part in [
        common_schemas(),
        device_schemas(),
        telemetry_schemas(),
        control_schemas(),
        claim_schemas(),
        ota_schemas(),
        token_schemas(),
    ] {
        if let Value::Object(part) = part {
            map.extend(part);
        }
    }
    for (page, item) in [
        ("DevicePage", "Device"),
        ("DetectionPage", "Detection"),
        ("HealthPage", "StoredHealth"),
        ("CommandPage", "Command"),
        ("ClaimTokenPage", "ClaimToken"),
        ("AllowedIdentityPage", "AllowedIdentity"),
        ("ApiTokenPage", "ApiToken"),
        ("FirmwarePage", "Firmware"),
        ("RolloutPage", "Rollout"),
    ] {
        map.insert(page.to_owned(), page_of(item));
    }
    Value::Object(map)
}

/// An object schema with every property required.
fn object(description: &str, properties: Value) -> Value {
    let required: Vec<String> = properties
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    json!({ "type": "object", "description": description, "required": required, "properties": properties, "additionalProperties": false })
}

/// An input object schema: only `required` must be present.
fn input(description: &str, required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "description": description, "required": required, "properties": properties, "additionalProperties": false })
}

fn string_enum(description: &str, values: &[&str]) -> Value {
    json!({ "type": "string", "description": description, "enum": values })
}

fn nullable(schema: Value) -> Value {
    json!({ "oneOf": [schema, { "type": "null" }] })
}

fn int(minimum: i64, maximum: i64) -> Value {
    json!({ "type": "integer", "minimum": minimum, "maximum": maximum })
}

fn millis() -> Value {
    json!({ "type": "integer", "description": "Unix milliseconds." })
}

fn millis_or_null() -> Value {
    json!({ "type": ["integer", "null"], "description": "Unix milliseconds." })
}

fn label_list(what: &str) -> Value {
    json!({
        "type": "array",
        "maxItems": LABELS_PER_DEVICE_MAX,
        "description": format!("{what}, each 1..={LABEL_LEN_MAX} bytes without control characters; stored sorted and deduplicated."),
        "items": { "type": "string", "minLength": 1, "maxLength": LABEL_LEN_MAX }
    })
}

fn common_schemas() -> Value {
    json!({
        "Error": object("Every error response.", json!({
            "error": object("What went wrong.", json!({
                "code": { "type": "string", "description": "Stable machine-readable code." },
                "message": { "type": "string", "description": "For people." }
            }))
        })),
        "HexKey": { "type": "string", "pattern": "^[0-9a-fA-F]{64}$", "description": "32 bytes as 64 hex digits." },
        "ServerInfo": object("What clients and traps pin.", json!({
            "version": { "type": "string" },
            "identity_public_key": { "$ref": "#/components/schemas/HexKey", "description": "The server's ed25519 identity public key (traps may pin it)." },
            "mqtt": object("Where traps connect: the embedded broker's listeners, or the external broker's address for both versions.", json!({
                "v4": { "type": "string", "description": "MQTT 3.1.1 `host:port`." },
                "v5": { "type": "string", "description": "MQTT 5 `host:port`." }
            }))
        })),
        "ResetReason": string_enum("Why the device last reset.", &["PowerOn", "Brownout", "Watchdog", "Panic", "Software", "DeepSleepWake", "External", "Unknown"]),
        "Chip": string_enum("The chip.", &["Esp32c3", "Esp32c6", "Host"]),
        "FirmwareVersion": object("Compared as (major, minor, patch).", json!({
            "major": int(0, 65535), "minor": int(0, 65535), "patch": int(0, 65535)
        })),
    })
}

fn device_schemas() -> Value {
    json!({
        "DeviceStatus": string_enum("Whether a device may connect.", &["active", "revoked"]),
        "DeviceInfo": object("What the device said in its last hello.", json!({
            "hardware_model": { "type": "string", "maxLength": 24 },
            "chip": schema("Chip"),
            "firmware": schema("FirmwareVersion"),
            "secure_version": { "type": "integer", "minimum": 0 },
            "reset_reason": schema("ResetReason"),
            "capabilities": { "type": "integer", "minimum": 0, "description": "Bits: 1 PIR, 2 classifier, 4 full-image upload, 8 solar, 16 removable storage, 32 OTA." },
            "config_version": { "type": "integer", "minimum": 0 },
            "hello_at_ms": millis()
        })),
        "Deployment": object("Where a device is deployed.", json!({
            "site": { "type": "string" },
            "latitude": { "type": ["number", "null"], "minimum": -90, "maximum": 90 },
            "longitude": { "type": ["number", "null"], "minimum": -180, "maximum": 180 },
            "camera_height_m": { "type": ["number", "null"], "minimum": 0, "maximum": 100 },
            "start_ms": millis_or_null(),
            "end_ms": millis_or_null()
        })),
        "DeploymentInput": input("Where a device is deployed; latitude and longitude go together; `end_ms` not before `start_ms`.", &["site"], json!({
            "site": { "type": "string", "minLength": 1, "maxLength": LABEL_LEN_MAX },
            "latitude": { "type": ["number", "null"], "minimum": -90, "maximum": 90 },
            "longitude": { "type": ["number", "null"], "minimum": -180, "maximum": 180 },
            "camera_height_m": { "type": ["number", "null"], "minimum": 0, "maximum": 100 },
            "start_ms": millis_or_null(),
            "end_ms": millis_or_null()
        })),
        "TagsInput": input("The device's new tags.", &["tags"], json!({ "tags": label_list("Tags") })),
        "GroupsInput": input("The device's new groups.", &["groups"], json!({ "groups": label_list("Groups") })),
        "Device": object("A registered device (no secrets).", json!({
            "id": { "type": "string" },
            "identity_key": schema("HexKey"),
            "status": schema("DeviceStatus"),
            "revoked_at_ms": millis_or_null(),
            "claim_id": { "type": ["string", "null"], "description": "The claim token it was claimed with; `null`: the allow-list." },
            "created_at_ms": millis(),
            "last_seen_at_ms": millis_or_null(),
            "info": nullable(schema("DeviceInfo")),
            "acked_through": { "type": "integer", "minimum": 0, "description": "Highest contiguous detection sequence stored." },
            "queue_floor": { "type": "integer", "minimum": 0 },
            "queue_next": { "type": "integer", "minimum": 0 },
            "last_health": nullable(schema("Health")),
            "groups": { "type": "array", "items": { "type": "string" } },
            "tags": { "type": "array", "items": { "type": "string" } },
            "deployment": nullable(schema("Deployment")),
            "desired_config": nullable(schema("DesiredConfig")),
            "reported_config": nullable(schema("ReportedConfig"))
        })),
    })
}

fn telemetry_schemas() -> Value {
    json!({
        "Trigger": string_enum("What fired the capture.", &["Pir", "TimeLapse", "Manual"]),
        "Classification": object("One classifier result.", json!({
            "label": int(0, 65535),
            "confidence_pct": int(0, 100)
        })),
        "BoundingBox": object("In units of 1/10,000 of the frame, origin top left.", json!({
            "x": int(0, 10000), "y": int(0, 10000), "width": int(0, 10000), "height": int(0, 10000)
        })),
        "Detection": object("A stored detection.", json!({
            "device_id": { "type": "string" },
            "received_at_ms": millis(),
            "seq": { "type": "integer", "minimum": 1, "description": "Per-device sequence number." },
            "captured_at_s": { "type": "integer", "minimum": 0, "description": "Capture time, Unix seconds (the trap's clock)." },
            "trigger": schema("Trigger"),
            "burst_index": int(0, 255),
            "burst_len": int(1, 255),
            "classes": { "type": "array", "maxItems": 4, "items": schema("Classification"), "description": "Best first; empty: no classifier, or blank." },
            "bbox": nullable(schema("BoundingBox")),
            "image_len": { "type": "integer", "minimum": 0, "description": "Bytes." },
            "image_digest": { "type": "string", "pattern": "^[0-9a-f]{16}$", "description": "First 8 bytes of the image's SHA-256, hex." },
            "battery_mv": int(0, 65535)
        })),
        "ChargeState": string_enum("Charger state.", &["Discharging", "Charging", "Full", "Unknown"]),
        "Health": object("A health report as the trap sent it.", json!({
            "taken_at": { "type": "integer", "minimum": 0, "description": "Unix seconds." },
            "battery_mv": int(0, 65535),
            "battery_soc_pct": int(0, 100),
            "charge_state": schema("ChargeState"),
            "solar_mw": int(0, 65535),
            "temperature_decicelsius": int(-32768, 32767),
            "storage_free_kib": { "type": "integer", "minimum": 0 },
            "storage_errors": int(0, 65535),
            "rssi_dbm": int(-128, 127),
            "uptime_s": { "type": "integer", "minimum": 0 },
            "reset_reason": schema("ResetReason"),
            "triggers_since_last": int(0, 65535),
            "queue_depth": { "type": "integer", "minimum": 0 },
            "queue_dropped_total": { "type": "integer", "minimum": 0 }
        })),
        "StoredHealth": object("A stored health report.", json!({
            "id": { "type": "integer" },
            "device_id": { "type": "string" },
            "received_at_ms": millis(),
            "health": schema("Health")
        })),
    })
}

fn control_schemas() -> Value {
    json!({
        "UploadPolicy": string_enum("What the trap uploads besides metadata.", &["MetadataOnly", "NonBlankImages", "AllImages"]),
        "CaptureWindow": object("A daily window, minutes since local midnight; `start_min > end_min` wraps past midnight.", json!({
            "start_min": int(0, 1439), "end_min": int(0, 1439)
        })),
        "TrapConfig": object("A trap's configuration (the SDK's `TrapConfig`).", json!({
            "pir_sensitivity_pct": int(0, 100),
            "burst_len": int(1, 10),
            "capture_windows": { "type": "array", "maxItems": 4, "items": schema("CaptureWindow"), "description": "Empty: always armed." },
            "timelapse_interval_s": { "type": "integer", "minimum": 0, "description": "0 disables time-lapse." },
            "checkin_interval_s": int(60, 86400),
            "upload_policy": schema("UploadPolicy")
        })),
        "ConfigStatus": string_enum("What the trap did with the latest desired version.", &["Applied", "RejectedUnsupported", "RejectedInvalid"]),
        "DesiredConfig": object("The configuration operators want the trap to run.", json!({
            "version": { "type": "integer", "minimum": 1 },
            "config": schema("TrapConfig"),
            "set_at_ms": millis_or_null()
        })),
        "ReportedConfig": object("The configuration the trap reports running.", json!({
            "version": { "type": "integer", "minimum": 0 },
            "status": schema("ConfigStatus"),
            "desired_version": { "type": "integer", "minimum": 0 },
            "config": schema("TrapConfig"),
            "received_at_ms": millis()
        })),
        "DeviceConfig": object("Desired and reported configuration.", json!({
            "desired": nullable(schema("DesiredConfig")),
            "reported": nullable(schema("ReportedConfig"))
        })),
        "ConfigUpdate": object("A stored desired configuration.", json!({
            "desired": schema("DesiredConfig"),
            "published": { "type": "boolean", "description": "Published on the trap's downlink topic now, so a connected trap receives it at once; `false` if publishing failed. Either way a trap gets it on its next hello." }
        })),
        "CommandKind": string_enum("What a command asks for.", &["reboot", "capture_now", "format_storage", "send_full_image"]),
        "NewCommand": input("A command to queue.", &["kind"], json!({
            "kind": schema("CommandKind"),
            "seq": { "type": "integer", "minimum": 0, "description": "The detection's sequence; required for `send_full_image`, refused otherwise." },
            "ttl_s": { "type": "integer", "minimum": 1, "maximum": COMMAND_TTL_MAX_S, "default": COMMAND_TTL_DEFAULT_S }
        })),
        "CommandState": string_enum("Where a command stands.", &["pending", "delivered", "done", "expired"]),
        "CommandStatus": string_enum("The trap's answer.", &["Done", "Expired", "Unsupported", "Failed", "Duplicate"]),
        "Command": command_schema(),
        "QueuedCommand": object("A queued command.", json!({
            "command": schema("Command"),
            "published": { "type": "boolean", "description": "The device's open commands were published on its downlink topic now, so a connected trap receives them at once; `false` if publishing failed. Either way a trap gets them on its next hello." }
        })),
    })
}

fn command_schema() -> Value {
    let mut command = object(
        "A stored command.",
        json!({
            "id": { "type": "integer", "minimum": 1 },
            "device_id": { "type": "string" },
            "kind": { "type": "string", "enum": ["reboot", "capture_now", "format_storage", "send_full_image", "unknown"] },
            "seq": { "type": "integer", "minimum": 0, "description": "Only for `send_full_image`." },
            "ttl_s": { "type": "integer", "minimum": 1 },
            "created_at_ms": millis(),
            "expires_at_ms": millis(),
            "state": schema("CommandState"),
            "delivered_at_ms": millis_or_null(),
            "deliveries": { "type": "integer", "minimum": 0 },
            "result": nullable(schema("CommandStatus")),
            "completed_at_ms": millis_or_null()
        }),
    );
    if let Some(required) = command["required"].as_array_mut() {
        required.retain(|name| name != "seq");
    }
    command
}

fn claim_schemas() -> Value {
    json!({
        "ClaimToken": object("A stored claim token (never its secret).", json!({
            "id": { "type": "string", "description": "The public id." },
            "uses_max": { "type": "integer", "minimum": 1 },
            "uses": { "type": "integer", "minimum": 0 },
            "expires_at_ms": millis(),
            "created_at_ms": millis(),
            "revoked_at_ms": millis_or_null(),
            "label": { "type": "string" }
        })),
        "NewClaimToken": input("A claim token to create.", &[], json!({
            "uses": { "type": "integer", "minimum": 1, "default": 1, "description": "How many devices may claim with it." },
            "expires_in_s": { "type": "integer", "minimum": 1, "maximum": CLAIM_TOKEN_LIFETIME_MAX_S, "default": CLAIM_TOKEN_LIFETIME_DEFAULT_S },
            "label": { "type": "string", "maxLength": LABEL_LEN_MAX, "default": "" }
        })),
        "CreatedClaimToken": object("A new claim token.", json!({
            "token": { "type": "string", "description": "`{id}.{secret}`: give it to the installer. Shown once." },
            "claim_token": schema("ClaimToken")
        })),
        "AllowedIdentity": object("An identity key that may claim without a token.", json!({
            "identity_key": schema("HexKey"),
            "note": { "type": "string" },
            "created_at_ms": millis()
        })),
        "NewAllowedIdentity": input("An identity key to allow.", &["identity_key"], json!({
            "identity_key": schema("HexKey"),
            "note": { "type": "string", "maxLength": LABEL_LEN_MAX, "default": "" }
        })),
    })
}

fn ota_schemas() -> Value {
    let states: Vec<&str> = TargetState::ALL.iter().map(|s| s.as_str()).collect();
    let counts: Map<String, Value> = states
        .iter()
        .map(|s| ((*s).to_owned(), json!({ "type": "integer", "minimum": 0 })))
        .collect();
    let rollout = json!({
        "id": { "type": "integer", "minimum": 1, "description": "Also the `rollout_id` on the wire." },
        "firmware_id": { "type": "integer", "minimum": 1 },
        "version": schema("FirmwareVersion"),
        "chip": schema("Chip"),
        "state": schema("RolloutState"),
        "pause_reason": { "type": ["string", "null"], "description": "Why it paused: an operator, or the failure threshold." },
        "max_in_flight": int(i64::from(*MAX_IN_FLIGHT_RANGE.start()), i64::from(*MAX_IN_FLIGHT_RANGE.end())),
        "failure_threshold": int(i64::from(*FAILURE_THRESHOLD_RANGE.start()), i64::from(*FAILURE_THRESHOLD_RANGE.end())),
        "counts": object("Targets per state.", Value::Object(counts)),
        "created_at_ms": millis(),
        "updated_at_ms": millis()
    });
    let mut detail = rollout.clone();
    detail["devices"] = json!({ "type": "array", "items": schema("RolloutDevice") });
    json!({
        "Firmware": object("An uploaded firmware image (its manifest, checked).", json!({
            "id": { "type": "integer", "minimum": 1 },
            "sha256": { "type": "string", "pattern": "^[0-9a-f]{64}$" },
            "size": { "type": "integer", "minimum": 1, "description": "Bytes." },
            "chip": schema("Chip"),
            "version": schema("FirmwareVersion"),
            "secure_version": { "type": "integer", "minimum": 0 },
            "min_battery_mv": int(0, 65535),
            "signing_key": { "$ref": "#/components/schemas/HexKey", "description": "The configured public key the manifest verified under." },
            "created_at_ms": millis()
        })),
        "FirmwareUpload": object("An upload's answer.", json!({
            "firmware": schema("Firmware"),
            "created": { "type": "boolean", "description": "`false`: this image was stored already." }
        })),
        "NewRollout": input("A rollout to create: name devices, set `all`, or both.", &["firmware_id"], json!({
            "firmware_id": { "type": "integer", "minimum": 1 },
            "devices": { "type": "array", "maxItems": ROLLOUT_TARGETS_MAX, "items": { "type": "string" }, "default": [] },
            "all": { "type": "boolean", "default": false, "description": "Every active device of the firmware's chip running an older version." },
            "max_in_flight": { "type": "integer", "minimum": MAX_IN_FLIGHT_RANGE.start(), "maximum": MAX_IN_FLIGHT_RANGE.end(), "description": "Devices offered or downloading at once (default `[ota] max_in_flight`)." },
            "failure_threshold": { "type": "integer", "minimum": FAILURE_THRESHOLD_RANGE.start(), "maximum": FAILURE_THRESHOLD_RANGE.end(), "description": "Failed or rolled-back devices that pause the rollout (default `[ota] failure_threshold`)." }
        })),
        "RolloutState": string_enum("Where a rollout stands.", &["active", "paused", "aborted", "completed"]),
        "TargetState": string_enum("Where a device stands in a rollout.", &states),
        "Rollout": object("A rollout and its counts.", rollout),
        "RolloutDetail": object("A rollout, its counts and every target.", detail),
        "RolloutDevice": object("One target of a rollout.", json!({
            "device_id": { "type": "string" },
            "state": schema("TargetState"),
            "offset": { "type": "integer", "minimum": 0, "description": "Bytes the device has, as last reported or asked for." },
            "outcome": { "type": ["string", "null"], "description": "The outcome the device reported (`Confirmed`, `SelfTestFailed`, `DigestMismatch`, `Busy`...)." },
            "offers": { "type": "integer", "minimum": 0 },
            "updated_at_ms": millis()
        })),
    })
}

fn token_schemas() -> Value {
    json!({
        "ApiRole": string_enum("`admin`: everything; `read_only`: GET routes except `/tokens`.", &["admin", "read_only"]),
        "ApiToken": object("A stored operator token (never the token text).", json!({
            "id": { "type": "integer" },
            "role": schema("ApiRole"),
            "label": { "type": "string" },
            "created_at_ms": millis(),
            "revoked_at_ms": millis_or_null()
        })),
        "NewApiToken": input("A token to create.", &["role"], json!({
            "role": schema("ApiRole"),
            "label": { "type": "string", "maxLength": LABEL_LEN_MAX, "default": "" }
        })),
        "CreatedApiToken": object("A new operator token.", json!({
            "token": { "type": "string", "description": "`wcat_...`: use as `Authorization: Bearer <token>`. Shown once." },
            "info": schema("ApiToken")
        })),
    })
}

//! The operator API against a real server (broker, store, ingest on
//! ephemeral loopback ports): requests go through the router with tower's
//! `oneshot`, traps are real MQTT clients (`common::TestTrap`). Covers auth,
//! the registry's filters and pagination, claim token → trap → detections,
//! configuration and commands reaching a connected trap, revocation, the
//! OpenAPI document against the router and real responses, and error bodies.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use wildcam_fleet_server::Server;
use wildcam_fleet_server::api;
use wildcam_fleet_server::store::{ApiRole, ClaimAuthorization, NewDevice, PasswordHash};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    ChargeState, Classification, CommandKind, CommandResult, CommandStatus, ConfigStatus, Detection,
    Downlink, Health, ReportedConfig, ResetReason, TrapConfig, Trigger, Uplink,
};
use wildcam_sdk::seal::SessionKey;

use common::{TestTrap, WAIT, embedded_mqtt, provision, test_config};

/// A running server, its router, and an admin token for it.
struct Harness {
    server: Server,
    app: Router,
    admin: String,
    dir: tempfile::TempDir,
}

/// A response: status, `WWW-Authenticate`, JSON body (`null` if empty).
struct Answer {
    status: StatusCode,
    www_authenticate: Option<String>,
    body: Value,
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start(test_config(dir.path()))
            .await
            .expect("server starts");
        let created = server
            .state()
            .store
            .create_api_token(ApiRole::Admin, "test admin".into())
            .await
            .expect("admin token");
        let app = wildcam_fleet_server::http::router(server.state().clone());
        Self { server, app, admin: created.token, dir }
    }

    async fn request(&self, request: Request<Body>) -> Answer {
        let response = self.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let www_authenticate = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().expect("text").to_owned());
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
        Answer { status, www_authenticate, body }
    }

    /// `method /api/v1{path}` with an optional bearer token and JSON body.
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Answer {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"));
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(body).expect("encodes"))
            }
            None => Body::empty(),
        };
        self.request(builder.body(body).expect("request")).await
    }

    /// An admin call that must answer `expected`; returns the body.
    async fn admin(&self, method: &str, path: &str, body: Option<&Value>, expected: StatusCode) -> Value {
        let answer = self.call(method, path, Some(&self.admin), body).await;
        assert_eq!(answer.status, expected, "{method} {path}: {}", answer.body);
        answer.body
    }

    async fn get(&self, path: &str) -> Value {
        self.admin("GET", path, None, StatusCode::OK).await
    }

    /// A claim token created through the API.
    async fn claim_token(&self) -> String {
        let created = self
            .admin(
                "POST",
                "/claim-tokens",
                Some(&json!({ "uses": 1, "label": "api test" })),
                StatusCode::CREATED,
            )
            .await;
        created["token"].as_str().expect("token text").to_owned()
    }

    /// A trap provisioned with an API claim token, connected and said hello.
    async fn trap(&self, seed: u8) -> TestTrap {
        let token = self.claim_token().await;
        let provisioned = provision(embedded_mqtt(&self.server), Some(&token), [seed; 32])
            .await
            .expect("provisioned with the API's claim token");
        let mut trap = TestTrap::connect(embedded_mqtt(&self.server), &provisioned)
            .await
            .expect("connects");
        trap.send(&trap.hello()).await;
        trap
    }

    async fn stop(self) {
        self.server.shutdown().await.expect("clean shutdown");
    }
}

fn detection(seq: u32, label: u16, confidence_pct: u8) -> Uplink {
    Uplink::Detection(Detection {
        seq,
        captured_at: 1_795_000_000 + seq,
        trigger: Trigger::Pir,
        burst_index: 0,
        burst_len: 1,
        classes: [Classification { label, confidence_pct }]
            .into_iter()
            .collect(),
        bbox: None,
        image_len: 1_000 + seq,
        image_digest: [0xab; 8],
        battery_mv: 3_900,
    })
}

fn health_report() -> Uplink {
    Uplink::Health(Health {
        taken_at: 1_795_000_100,
        battery_mv: 3_900,
        battery_soc_pct: 80,
        charge_state: ChargeState::Discharging,
        solar_mw: 0,
        temperature_decicelsius: -35,
        storage_free_kib: 1_000,
        storage_errors: 0,
        rssi_dbm: -70,
        uptime_s: 10,
        reset_reason: ResetReason::PowerOn,
        triggers_since_last: 2,
        queue_depth: 0,
        queue_dropped_total: 0,
    })
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["id"].as_str().expect("id").to_owned())
        .collect()
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    let message = answer.body["error"]["message"].as_str().expect("message");
    assert!(!message.is_empty());
    conforms(&api::document(), "Error", &answer.body);
}

/// Polls `GET path` until `done` holds for its body (bounded by [`WAIT`]).
async fn eventually(harness: &Harness, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = harness.get(path).await;
        if done(&body) || tokio::time::Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- auth

#[tokio::test]
async fn tokens_authenticate_and_roles_limit_writes() {
    let harness = Harness::start().await;
    let missing = harness.call("GET", "/devices", None, None).await;
    assert_error(&missing, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(missing.www_authenticate.as_deref(), Some("Bearer"));
    let unknown = harness
        .call("GET", "/devices", Some("wcat_not-a-real-token"), None)
        .await;
    assert_error(&unknown, StatusCode::UNAUTHORIZED, "unauthorized");

    let created = harness
        .admin(
            "POST",
            "/tokens",
            Some(&json!({ "role": "read_only", "label": "dashboard" })),
            StatusCode::CREATED,
        )
        .await;
    conforms(&api::document(), "CreatedApiToken", &created);
    let reader = created["token"].as_str().expect("token");
    assert_eq!(
        harness
            .call("GET", "/devices", Some(reader), None)
            .await
            .status,
        StatusCode::OK
    );
    let write = harness
        .call("POST", "/claim-tokens", Some(reader), Some(&json!({})))
        .await;
    assert_error(&write, StatusCode::FORBIDDEN, "forbidden");
    let tokens = harness.call("GET", "/tokens", Some(reader), None).await;
    assert_error(&tokens, StatusCode::FORBIDDEN, "forbidden");
    let open = harness.call("GET", "/openapi.json", None, None).await;
    assert_eq!(open.status, StatusCode::OK);

    let id = created["info"]["id"].as_i64().expect("id");
    harness
        .admin("POST", &format!("/tokens/{id}/revoke"), None, StatusCode::NO_CONTENT)
        .await;
    let revoked = harness.call("GET", "/devices", Some(reader), None).await;
    assert_error(&revoked, StatusCode::UNAUTHORIZED, "unauthorized");
    let listed = harness.get("/tokens").await;
    conforms(&api::document(), "ApiTokenPage", &listed);
    assert_eq!(listed["items"].as_array().expect("items").len(), 2);
    assert!(listed["items"][1]["revoked_at_ms"].is_i64());
    harness.stop().await;
}

// ---------------------------------------------------------------- registry

async fn register(harness: &Harness, name: &str, seed: u8) {
    let store = &harness.server.state().store;
    store
        .allow_identity([seed; 32], "factory".into())
        .await
        .expect("allowed");
    store
        .create_device(NewDevice {
            id: DeviceId::new(name).expect("id"),
            identity_key: [seed; 32],
            mqtt_password_hash: PasswordHash::of("unused"),
            session_key: SessionKey::from_bytes([seed; 32]),
            authorization: ClaimAuthorization::AllowList,
        })
        .await
        .expect("registered");
}

#[tokio::test]
async fn devices_are_filtered_labelled_and_paginated() {
    let harness = Harness::start().await;
    for (seed, name) in (1u8..).zip(["dev-a", "dev-b", "dev-c", "dev-d", "dev-e"]) {
        register(&harness, name, seed).await;
    }
    let tags = json!({ "tags": ["north", "solar"] });
    for name in ["dev-a", "dev-b"] {
        harness
            .admin("PUT", &format!("/devices/{name}/tags"), Some(&tags), StatusCode::OK)
            .await;
    }
    let device = harness
        .admin("PUT", "/devices/dev-a/groups", Some(&json!({ "groups": ["g1"] })), StatusCode::OK)
        .await;
    assert_eq!(device["groups"], json!(["g1"]));
    let deployment = json!({ "site": "ridge", "latitude": 46.5, "longitude": 7.9, "camera_height_m": 1.2 });
    let device = harness
        .admin("PUT", "/devices/dev-b/deployment", Some(&deployment), StatusCode::OK)
        .await;
    assert_eq!(device["deployment"]["site"], "ridge");
    conforms(&api::document(), "Device", &device);
    let revoked = harness
        .admin("POST", "/devices/dev-e/revoke", None, StatusCode::OK)
        .await;
    assert_eq!(revoked["status"], "revoked");

    assert_eq!(ids(&harness.get("/devices?tag=north").await), ["dev-a", "dev-b"]);
    assert_eq!(ids(&harness.get("/devices?group=g1").await), ["dev-a"]);
    assert_eq!(ids(&harness.get("/devices?site=ridge").await), ["dev-b"]);
    assert_eq!(ids(&harness.get("/devices?status=revoked").await), ["dev-e"]);
    assert_eq!(
        ids(&harness
            .get("/devices?status=active&tag=solar&group=g1")
            .await),
        ["dev-a"]
    );
    assert!(ids(&harness.get("/devices?seen_since=0").await).is_empty(), "never seen");

    let mut pages = Vec::new();
    let mut path = "/devices?limit=2".to_owned();
    loop {
        let page = harness.get(&path).await;
        conforms(&api::document(), "DevicePage", &page);
        pages.push(ids(&page));
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        path = format!("/devices?limit=2&cursor={cursor}");
        assert!(pages.len() < 5, "pagination terminates");
    }
    assert_eq!(pages, [vec!["dev-a", "dev-b"], vec!["dev-c", "dev-d"], vec!["dev-e"]]);

    let cleared = harness
        .admin("PUT", "/devices/dev-b/deployment", Some(&Value::Null), StatusCode::OK)
        .await;
    assert!(cleared["deployment"].is_null());
    let bad = harness
        .call(
            "PUT",
            "/devices/dev-b/deployment",
            Some(&harness.admin),
            Some(&json!({ "site": "x", "latitude": 91.0, "longitude": 0.0 })),
        )
        .await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");
    harness.stop().await;
}

// ---------------------------------------------------------------- claim → detections

#[tokio::test]
async fn a_claim_token_provisions_a_trap_whose_detections_come_back_filtered() {
    let harness = Harness::start().await;
    let mut trap = harness.trap(11).await;
    trap.send(&health_report()).await;
    let sent = [(1, 17, 95), (2, 17, 40), (3, 4, 99), (4, 17, 75)];
    for (seq, label, confidence) in sent {
        trap.send(&detection(seq, label, confidence)).await;
    }
    assert_eq!(trap.wait_ack(4).await, Ok(4));
    let id = trap.id.as_str();

    let all = harness.get(&format!("/detections?device={id}")).await;
    conforms(&api::document(), "DetectionPage", &all);
    let seqs = |page: &Value| -> Vec<u64> {
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|d| d["seq"].as_u64().expect("seq"))
            .collect()
    };
    assert_eq!(seqs(&all), [1, 2, 3, 4]);
    assert_eq!(all["items"][0]["image_digest"], "abababababababab");
    assert_eq!(all["items"][0]["classes"], json!([{ "label": 17, "confidence_pct": 95 }]));
    let deer = harness
        .get(&format!("/detections?device={id}&label=17&min_confidence=70"))
        .await;
    assert_eq!(seqs(&deer), [1, 4]);
    let confident = harness
        .get("/detections?min_confidence=90&order=desc")
        .await;
    assert_eq!(seqs(&confident), [3, 1]);
    let window = harness
        .get("/detections?from=1795000002&until=1795000004&limit=1")
        .await;
    assert_eq!(seqs(&window), [2]);
    let cursor = window["next_cursor"].as_str().expect("more");
    let next = harness
        .get(&format!("/detections?from=1795000002&until=1795000004&limit=1&cursor={cursor}"))
        .await;
    assert_eq!(seqs(&next), [3]);
    assert!(next["next_cursor"].is_null());

    let device = harness.get(&format!("/devices/{id}")).await;
    conforms(&api::document(), "Device", &device);
    assert_eq!(device["acked_through"], 4);
    assert_eq!(device["info"]["hardware_model"], "test-trap");
    assert_eq!(ids(&harness.get("/devices?seen_since=1").await), [id]);
    let health = harness.get(&format!("/devices/{id}/health")).await;
    conforms(&api::document(), "HealthPage", &health);
    assert_eq!(health["items"][0]["health"]["temperature_decicelsius"], -35);
    let tokens = harness.get("/claim-tokens").await;
    conforms(&api::document(), "ClaimTokenPage", &tokens);
    assert_eq!(tokens["items"][0]["uses"], 1);
    harness.stop().await;
}

// ---------------------------------------------------------------- control

#[tokio::test]
async fn configuration_is_validated_stored_and_delivered_to_a_connected_trap() {
    let harness = Harness::start().await;
    let mut trap = harness.trap(21).await;
    let id = trap.id.to_string();
    let path = format!("/devices/{id}/config");

    let mut config = serde_json::to_value(TrapConfig::default()).expect("config");
    config["burst_len"] = json!(0);
    let refused = harness
        .call("PUT", &path, Some(&harness.admin), Some(&config))
        .await;
    assert_error(&refused, StatusCode::UNPROCESSABLE_ENTITY, "invalid_config");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("burst_len")
    );
    let malformed = harness
        .call("PUT", &path, Some(&harness.admin), Some(&json!({ "burst_len": "three" })))
        .await;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "invalid_body");

    config["burst_len"] = json!(5);
    config["capture_windows"] = json!([{ "start_min": 1080, "end_min": 360 }]);
    let update = harness
        .admin("PUT", &path, Some(&config), StatusCode::OK)
        .await;
    conforms(&api::document(), "ConfigUpdate", &update);
    assert_eq!(update["published"], true);
    let version = update["desired"]["version"].as_u64().expect("version");
    let desired = loop {
        match trap
            .next_downlink()
            .await
            .expect("a downlink within the wait")
        {
            Downlink::DesiredConfig(desired) => break desired,
            _ => continue,
        }
    };
    assert_eq!(u64::from(desired.version), version);
    assert_eq!(desired.config.burst_len, 5);
    assert_eq!(desired.config.capture_windows.len(), 1);

    let report = ReportedConfig {
        version: desired.version,
        status: ConfigStatus::Applied,
        desired_version: desired.version,
        config: desired.config.clone(),
    };
    trap.send(&Uplink::ReportedConfig(report)).await;
    let shown = eventually(&harness, &path, |c| !c["reported"].is_null()).await;
    conforms(&api::document(), "DeviceConfig", &shown);
    assert_eq!(shown["desired"]["config"], shown["reported"]["config"]);
    assert_eq!(shown["reported"]["status"], "Applied");
    harness.stop().await;
}

#[tokio::test]
async fn commands_reach_a_connected_trap_and_record_its_answer() {
    let harness = Harness::start().await;
    let mut trap = harness.trap(31).await;
    let path = format!("/devices/{}/commands", trap.id);

    let missing_seq = harness
        .call("POST", &path, Some(&harness.admin), Some(&json!({ "kind": "send_full_image" })))
        .await;
    assert_error(&missing_seq, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");
    let unknown_kind = harness
        .call("POST", &path, Some(&harness.admin), Some(&json!({ "kind": "self_destruct" })))
        .await;
    assert_error(&unknown_kind, StatusCode::BAD_REQUEST, "invalid_body");

    let body = json!({ "kind": "send_full_image", "seq": 3, "ttl_s": 600 });
    let queued = harness
        .admin("POST", &path, Some(&body), StatusCode::CREATED)
        .await;
    conforms(&api::document(), "QueuedCommand", &queued);
    assert_eq!(queued["published"], true);
    assert_eq!(queued["command"]["state"], "delivered");
    let command = loop {
        match trap
            .next_downlink()
            .await
            .expect("a downlink within the wait")
        {
            Downlink::Command(command) => break command,
            _ => continue,
        }
    };
    assert_eq!(command.kind, CommandKind::SendFullImage { seq: 3 });
    assert_eq!(u64::from(command.id), queued["command"]["id"].as_u64().expect("id"));

    trap.send(&Uplink::CommandResult(CommandResult { id: command.id, status: CommandStatus::Done }))
        .await;
    let listed = eventually(&harness, &path, |page| page["items"][0]["state"] == "done").await;
    conforms(&api::document(), "CommandPage", &listed);
    assert_eq!(listed["items"][0]["result"], "Done");
    assert_eq!(listed["items"][0]["seq"], 3);
    harness.stop().await;
}

#[tokio::test]
async fn revoking_through_the_api_refuses_the_traps_next_message() {
    let harness = Harness::start().await;
    let mut trap = harness.trap(41).await;
    trap.send(&detection(1, 17, 90)).await;
    assert_eq!(trap.wait_ack(1).await, Ok(1));

    let id = trap.id.to_string();
    let revoked = harness
        .admin("POST", &format!("/devices/{id}/revoke"), None, StatusCode::OK)
        .await;
    assert_eq!(revoked["status"], "revoked");
    trap.send(&detection(2, 17, 90)).await;
    let no_ack = trap.wait_ack_within(2, Duration::from_millis(1_000)).await;
    assert!(no_ack.is_err(), "a revoked trap gets no ack");
    let stored = harness.get(&format!("/detections?device={id}")).await;
    assert_eq!(stored["items"].as_array().expect("items").len(), 1);
    let refused = common::Mqtt::connect(embedded_mqtt(&harness.server), &id, &id, &trap.password).await;
    assert!(refused.is_err(), "the broker refuses the revoked trap");
    let command = harness
        .call(
            "POST",
            &format!("/devices/{id}/commands"),
            Some(&harness.admin),
            Some(&json!({ "kind": "reboot" })),
        )
        .await;
    assert_error(&command, StatusCode::CONFLICT, "device_revoked");
    harness.stop().await;
}

// ---------------------------------------------------------------- claiming

#[tokio::test]
async fn claim_tokens_revoke_and_the_allowlist_admits_identities() {
    let harness = Harness::start().await;
    let created = harness
        .admin("POST", "/claim-tokens", Some(&json!({ "uses": 2, "expires_in_s": 60 })), StatusCode::CREATED)
        .await;
    conforms(&api::document(), "CreatedClaimToken", &created);
    let claim_id = created["claim_token"]["id"].as_str().expect("id");
    let revoked = harness
        .admin("POST", &format!("/claim-tokens/{claim_id}/revoke"), None, StatusCode::OK)
        .await;
    assert!(revoked["revoked_at_ms"].is_i64());
    let token = created["token"].as_str().expect("token");
    let refused = provision(embedded_mqtt(&harness.server), Some(token), [51; 32]).await;
    assert!(refused.expect_err("revoked").contains("Revoked"));
    let zero = harness
        .call("POST", "/claim-tokens", Some(&harness.admin), Some(&json!({ "uses": 0 })))
        .await;
    assert_error(&zero, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");

    let key = wildcam_sdk::provision::DeviceIdentity::from_seed([52; 32]).public_key();
    let hex = api::to_hex(&key);
    let allowed = harness
        .admin(
            "POST",
            "/allowlist",
            Some(&json!({ "identity_key": hex, "note": "batch 7" })),
            StatusCode::CREATED,
        )
        .await;
    conforms(&api::document(), "AllowedIdentity", &allowed);
    let listed = harness.get("/allowlist").await;
    conforms(&api::document(), "AllowedIdentityPage", &listed);
    assert_eq!(listed["items"][0]["identity_key"], hex.as_str());
    provision(embedded_mqtt(&harness.server), None, [52; 32])
        .await
        .expect("an allowed identity claims without a token");
    harness
        .admin("DELETE", &format!("/allowlist/{hex}"), None, StatusCode::NO_CONTENT)
        .await;
    let gone = harness
        .call("DELETE", &format!("/allowlist/{hex}"), Some(&harness.admin), None)
        .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "identity_not_found");
    let bad_key = harness
        .call("POST", "/allowlist", Some(&harness.admin), Some(&json!({ "identity_key": "abc" })))
        .await;
    assert_error(&bad_key, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");

    let info = harness.get("/server").await;
    conforms(&api::document(), "ServerInfo", &info);
    let identity = api::to_hex(&harness.server.state().identity_public_key);
    assert_eq!(info["identity_public_key"], identity.as_str());
    assert_eq!(info["mqtt"]["v4"], embedded_mqtt(&harness.server).to_string().as_str());
    harness.stop().await;
}

// ---------------------------------------------------------------- errors

#[tokio::test]
async fn errors_are_json_with_a_code_and_a_message() {
    let harness = Harness::start().await;
    register(&harness, "dev-x", 61).await;
    let token = Some(harness.admin.as_str());
    let cases: [(&str, &str, StatusCode, &str); 8] = [
        ("GET", "/no/such/route", StatusCode::NOT_FOUND, "route_not_found"),
        ("DELETE", "/devices", StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("GET", "/devices?limit=5000", StatusCode::BAD_REQUEST, "invalid_limit"),
        ("GET", "/devices?cursor=garbage", StatusCode::BAD_REQUEST, "invalid_cursor"),
        ("GET", "/devices?colour=red", StatusCode::BAD_REQUEST, "invalid_query"),
        ("GET", "/devices/nosuch", StatusCode::NOT_FOUND, "device_not_found"),
        ("GET", "/devices/bad%20id", StatusCode::BAD_REQUEST, "invalid_device_id"),
        ("GET", "/detections?min_confidence=101", StatusCode::BAD_REQUEST, "invalid_query"),
    ];
    for (method, path, status, code) in cases {
        assert_error(&harness.call(method, path, token, None).await, status, code);
    }
    let tags = "/devices/dev-x/tags";
    let unknown = harness
        .call("PUT", "/devices/nosuch/tags", token, Some(&json!({ "tags": [] })))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "device_not_found");
    let long = harness
        .call("PUT", tags, token, Some(&json!({ "tags": ["x".repeat(200)] })))
        .await;
    assert_error(&long, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");

    let raw = |body: Body, content_type: Option<&str>| {
        let mut builder = Request::builder()
            .method("PUT")
            .uri(format!("/api/v1{tags}"))
            .header(header::AUTHORIZATION, format!("Bearer {}", harness.admin));
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        builder.body(body).expect("request")
    };
    let json_type = Some("application/json");
    let syntax = harness
        .request(raw(Body::from("{\"tags\": ["), json_type))
        .await;
    assert_error(&syntax, StatusCode::BAD_REQUEST, "invalid_body");
    let plain = harness.request(raw(Body::from("{}"), None)).await;
    assert_error(&plain, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let huge = format!("{{\"tags\": [\"{}\"]}}", "x".repeat(api::BODY_LIMIT_BYTES));
    let too_large = harness.request(raw(Body::from(huge), json_type)).await;
    assert_error(&too_large, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    harness.stop().await;
}

// ---------------------------------------------------------------- OpenAPI

#[tokio::test]
async fn the_openapi_document_matches_the_router() {
    let harness = Harness::start().await;
    let document = harness.call("GET", "/openapi.json", None, None).await.body;
    assert_eq!(document["openapi"], "3.1.0");
    let (_, served) = api::routes(harness.server.state().clone());
    let served: BTreeSet<(String, String)> = served
        .iter()
        .map(|route| (route.path.to_owned(), route.verb.openapi_key().to_owned()))
        .collect();
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            documented.insert((path.clone(), method.clone()));
            check_path_parameters(&document, path, operation);
        }
    }
    assert_eq!(served, documented, "served routes and documented routes differ");
    check_refs(&document, &document);

    for (path, method) in &served {
        let concrete = path
            .replace("{identity_key}", &"0".repeat(64))
            .replace("{id}", "99999");
        let body = (method != "get" && method != "delete").then(|| json!({}));
        let answer = harness
            .call(&method.to_uppercase(), &concrete, Some(&harness.admin), body.as_ref())
            .await;
        assert_ne!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_ne!(answer.body["error"]["code"], "route_not_found", "{method} {path}");
    }
    harness.stop().await;
}

/// Every `{name}` in `path` is a declared path parameter, and vice versa.
fn check_path_parameters(document: &Value, path: &str, operation: &Value) {
    let in_path: BTreeSet<&str> = path
        .split('/')
        .filter_map(|part| part.strip_prefix('{').and_then(|p| p.strip_suffix('}')))
        .collect();
    let declared: BTreeSet<String> = operation["parameters"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| resolve(document, p))
        .filter(|p| p["in"] == "path")
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect();
    let in_path: BTreeSet<String> = in_path.into_iter().map(str::to_owned).collect();
    assert_eq!(in_path, declared, "path parameters of {path}");
}

/// `value`, or what its `$ref` points at (recursively).
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("local reference");
            let target = document
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling reference {reference}"));
            resolve(document, target)
        }
        None => value,
    }
}

/// Every `$ref` anywhere in `value` resolves.
fn check_refs(document: &Value, value: &Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("$ref") {
                resolve(document, value);
            }
            map.values().for_each(|v| check_refs(document, v));
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(document, v)),
        _ => {}
    }
}

/// `value` has exactly the shape the document's schema `name` describes
/// (properties, required members, types, enums), or the test fails.
fn conforms(document: &Value, name: &str, value: &Value) {
    let schema = json!({ "$ref": format!("#/components/schemas/{name}") });
    if let Err(problem) = check(document, &schema, value, name) {
        panic!("response does not match schema {name}: {problem}\n{value:#}");
    }
}

fn check(document: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(document, schema);
    if let Some(options) = schema["oneOf"].as_array() {
        return options
            .iter()
            .find(|option| check(document, option, value, at).is_ok())
            .map(|_| ())
            .ok_or_else(|| format!("{at}: matches no option"));
    }
    check_type(schema, value, at)?;
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let (Some(properties), Some(object)) = (schema["properties"].as_object(), value.as_object()) {
        for key in object.keys() {
            let property = properties
                .get(key)
                .ok_or_else(|| format!("{at}: undocumented property {key}"))?;
            check(document, property, &object[key], &format!("{at}.{key}"))?;
        }
        for required in schema["required"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let key = required.as_str().unwrap_or_default();
            if !object.contains_key(key) {
                return Err(format!("{at}: missing required property {key}"));
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            check(document, items, item, &format!("{at}[{index}]"))?;
        }
    }
    Ok(())
}

fn check_type(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let fits = |kind: &str| match kind {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    };
    if types.iter().any(|kind| fits(kind)) {
        Ok(())
    } else {
        Err(format!("{at}: {value} is not of type {types:?}"))
    }
}

#[test]
#[should_panic(expected = "undocumented property extra")]
fn the_schema_check_refuses_undocumented_properties() {
    let info =
        json!({ "version": "0", "identity_public_key": "00", "mqtt": { "v4": "a", "v5": "b" }, "extra": 1 });
    conforms(&api::document(), "ServerInfo", &info);
}

#[test]
#[should_panic(expected = "missing required property")]
fn the_schema_check_refuses_missing_members() {
    conforms(&api::document(), "Error", &json!({ "error": { "code": "x" } }));
}

// ---------------------------------------------------------------- the CLI

/// Runs `wildcam-fleet args...` (bounded by [`WAIT`]); its standard output,
/// or the test fails with its standard error.
async fn cli(args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wildcam-fleet"));
    command.args(args).kill_on_drop(true);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WILDCAM")) {
        command.env_remove(name);
    }
    let output = tokio::time::timeout(WAIT, command.output())
        .await
        .expect("the command finishes in time")
        .expect("the command runs");
    let stdout = String::from_utf8(output.stdout).expect("text");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "wildcam-fleet {args:?} failed: {stderr}\n{stdout}");
    stdout
}

#[tokio::test]
async fn the_cli_bootstraps_a_token_then_claims_a_demo_trap_and_lists_its_detections() {
    let harness = Harness::start().await;
    let data_dir = harness.dir.path().to_str().expect("utf-8 path").to_owned();
    let token =
        cli(&["token", "create", "--role", "admin", "--label", "cli test", "--data-dir", &data_dir]).await;
    let token = token.trim();
    assert!(token.starts_with("wcat_"), "{token}");
    let server = format!("http://{}", harness.server.http());
    let api = ["--server", server.as_str(), "--token", token];

    let created: Value = serde_json::from_str(
        &cli(&[&["claim-tokens", "create", "--label", "cli"][..], &api, &["--json"]].concat()).await,
    )
    .expect("JSON");
    let claim = created["token"].as_str().expect("claim token");
    let mqtt = embedded_mqtt(&harness.server).to_string();
    let trap = cli(&["demo-trap", "--token", claim, "--count", "2", "--mqtt", &mqtt]).await;
    assert!(trap.contains("acked through seq 2"), "{trap}");

    let listed: Value =
        serde_json::from_str(&cli(&[&["detections", "list"][..], &api, &["--json"]].concat()).await)
            .expect("JSON");
    assert_eq!(listed["items"].as_array().expect("items").len(), 2);
    let table = cli(&[&["devices", "list"][..], &api].concat()).await;
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains("active"), "{table}");
    harness.stop().await;
}

//! Operator commands: each calls the HTTP API and prints a table (or the
//! JSON with `--json`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};

use super::client::{ApiClient, segment};
use super::output::{Table, json as pretty, text, time_ms, time_s};

/// How operator commands reach the API and print.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Base URL of the server's HTTP API.
    #[arg(long, global = true, env = "WILDCAM_SERVER", default_value = "http://127.0.0.1:18080")]
    pub server: String,
    /// Operator API token (`wcat_...`).
    #[arg(long, global = true, env = "WILDCAM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Pagination flags of list commands.
#[derive(Debug, Clone, Args, Serialize)]
pub struct PageArgs {
    /// Items per page (1..=1000, server default 100).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
    /// The cursor printed after the previous page.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
}

/// `devices ...`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices (filters combine).
    List(DeviceFilters),
    /// Show one device.
    Get {
        /// Device id.
        id: String,
    },
    /// Replace a device's tags (no tags: clear them).
    Tag {
        /// Device id.
        id: String,
        /// The new tags.
        tags: Vec<String>,
    },
    /// Revoke a device: the broker and ingest refuse it at once.
    Revoke {
        /// Device id.
        id: String,
    },
}

/// Filters of `devices list`.
#[derive(Debug, Args, Serialize)]
pub struct DeviceFilters {
    /// Only `active` or `revoked` devices.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
    /// Only members of this group.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    /// Only devices with this tag.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    /// Only devices deployed at this site.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    /// Only devices seen at or after this instant (Unix seconds).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seen_since: Option<u32>,
    #[command(flatten)]
    #[serde(flatten)]
    page: PageArgs,
}

/// `claim-tokens ...`.
#[derive(Debug, Subcommand)]
pub enum ClaimTokensCommand {
    /// Create a claim token; its text is printed once.
    Create {
        /// How many traps may claim with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Seconds until it expires (server default: 7 days).
        #[arg(long)]
        expires_in_s: Option<u32>,
        /// A note (batch, customer...).
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List claim tokens.
    List(PageArgs),
    /// Revoke a claim token by its id.
    Revoke {
        /// The token's public id (the part before the dot).
        id: String,
    },
}

/// `detections ...`.
#[derive(Debug, Subcommand)]
pub enum DetectionsCommand {
    /// List detections (filters combine).
    List(DetectionFilters),
}

/// Filters of `detections list`.
#[derive(Debug, Args, Serialize)]
pub struct DetectionFilters {
    /// Only this device's detections.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Captured at or after (Unix seconds).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<u32>,
    /// Captured before (Unix seconds).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<u32>,
    /// Only detections with a classifier result of this label id.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<u16>,
    /// Only results with at least this confidence (percent).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    min_confidence: Option<u8>,
    /// `asc` (oldest first) or `desc`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    page: PageArgs,
}

/// `health DEVICE`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Device id.
    id: String,
    #[command(flatten)]
    filters: HealthFilters,
}

/// Filters of `health`.
#[derive(Debug, Args, Serialize)]
pub struct HealthFilters {
    /// Taken at or after (Unix seconds).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<u32>,
    /// Taken before (Unix seconds).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<u32>,
    /// `asc` (oldest first) or `desc`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    page: PageArgs,
}

/// `config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show desired and reported configuration.
    Get {
        /// Device id.
        id: String,
    },
    /// Set the desired configuration from a JSON file (`-`: standard input).
    Set {
        /// Device id.
        id: String,
        /// A TrapConfig as JSON (see the OpenAPI document).
        file: PathBuf,
    },
}

/// `commands ...`.
#[derive(Debug, Subcommand)]
pub enum CommandsCommand {
    /// Queue a command and publish it to the trap.
    Send {
        /// Device id.
        id: String,
        /// What to do.
        kind: CommandKindArg,
        /// Sequence of the detection (send-full-image only).
        #[arg(long)]
        seq: Option<u32>,
        /// Seconds the command stays valid (server default: 1 hour).
        #[arg(long)]
        ttl_s: Option<u32>,
    },
    /// List a device's commands, newest first.
    List {
        /// Device id.
        id: String,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// A command kind on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CommandKindArg {
    /// Restart the trap.
    Reboot,
    /// Take a burst now.
    CaptureNow,
    /// Erase image storage.
    FormatStorage,
    /// Upload the full image of detection `--seq`.
    SendFullImage,
}

impl CommandKindArg {
    fn api_name(self) -> &'static str {
        match self {
            CommandKindArg::Reboot => "reboot",
            CommandKindArg::CaptureNow => "capture_now",
            CommandKindArg::FormatStorage => "format_storage",
            CommandKindArg::SendFullImage => "send_full_image",
        }
    }
}

/// One operator command, ready to run.
#[derive(Debug)]
pub enum OperatorCommand {
    /// `devices ...`.
    Devices(DevicesCommand),
    /// `claim-tokens ...`.
    ClaimTokens(ClaimTokensCommand),
    /// `detections ...`.
    Detections(DetectionsCommand),
    /// `health ...`.
    Health(HealthArgs),
    /// `config ...`.
    Config(ConfigCommand),
    /// `commands ...`.
    Commands(CommandsCommand),
    /// `firmware ...`.
    Firmware(super::ota::FirmwareCommand),
    /// `rollout ...`.
    Rollout(super::ota::RolloutCommand),
}

/// Runs `command` against the API and prints the result.
pub async fn run(args: &ApiArgs, command: OperatorCommand) -> Result<()> {
    let client = ApiClient::new(&args.server, args.token.clone())?;
    let printed = match command {
        OperatorCommand::Devices(command) => devices(&client, command, args.json).await?,
        OperatorCommand::ClaimTokens(command) => claim_tokens(&client, command, args.json).await?,
        OperatorCommand::Detections(DetectionsCommand::List(filters)) => {
            let page = client.get("/detections", &filters).await?;
            list_output(&page, args.json, detection_table)
        }
        OperatorCommand::Health(health) => {
            let page = client
                .get(&format!("/devices/{}/health", segment(&health.id)), &health.filters)
                .await?;
            list_output(&page, args.json, health_table)
        }
        OperatorCommand::Config(command) => config(&client, command, args.json).await?,
        OperatorCommand::Commands(command) => commands(&client, command, args.json).await?,
        OperatorCommand::Firmware(command) => super::ota::firmware(&client, command, args.json).await?,
        OperatorCommand::Rollout(command) => super::ota::rollout(&client, command, args.json).await?,
    };
    print!("{printed}");
    Ok(())
}

/// A page as JSON, or as a table and, when there is more, how to get it.
pub(super) fn list_output(page: &Value, as_json: bool, table: fn(&[Value]) -> Table) -> String {
    if as_json {
        return format!("{}\n", pretty(page));
    }
    let items = page["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = table(items).render();
    if let Some(cursor) = page["next_cursor"].as_str() {
        out.push_str(&format!("(more: add --cursor '{cursor}')\n"));
    }
    out
}

/// One object as JSON, or as `field  value` lines.
pub(super) fn object_output(value: &Value, as_json: bool, fields: &[(&'static str, String)]) -> String {
    if as_json {
        return format!("{}\n", pretty(value));
    }
    let mut table = Table::new(&["FIELD", "VALUE"]);
    for (name, cell) in fields {
        table.row(vec![(*name).to_owned(), cell.clone()]);
    }
    table.render()
}

async fn devices(client: &ApiClient, command: DevicesCommand, as_json: bool) -> Result<String> {
    let device = match command {
        DevicesCommand::List(filters) => {
            let page = client.get("/devices", &filters).await?;
            return Ok(list_output(&page, as_json, device_table));
        }
        DevicesCommand::Get { id } => {
            client
                .get(&format!("/devices/{}", segment(&id)), &())
                .await?
        }
        DevicesCommand::Tag { id, tags } => {
            let path = format!("/devices/{}/tags", segment(&id));
            client
                .send(Method::PUT, &path, Some(&json!({ "tags": tags })))
                .await?
        }
        DevicesCommand::Revoke { id } => {
            let path = format!("/devices/{}/revoke", segment(&id));
            client.send(Method::POST, &path, None).await?
        }
    };
    Ok(object_output(&device, as_json, &device_fields(&device)))
}

fn device_table(items: &[Value]) -> Table {
    let mut table = Table::new(&["ID", "STATUS", "LAST SEEN", "FIRMWARE", "SITE", "TAGS", "GROUPS", "ACKED"]);
    for device in items {
        table.row(vec![
            text(&device["id"]),
            text(&device["status"]),
            time_ms(&device["last_seen_at_ms"]),
            firmware(&device["info"]),
            text(&device["deployment"]["site"]),
            text(&device["tags"]),
            text(&device["groups"]),
            text(&device["acked_through"]),
        ]);
    }
    table
}

fn firmware(info: &Value) -> String {
    let version = &info["firmware"];
    if version.is_null() {
        return "-".into();
    }
    format!("{}.{}.{}", version["major"], version["minor"], version["patch"])
}

fn device_fields(device: &Value) -> Vec<(&'static str, String)> {
    let health = &device["last_health"];
    vec![
        ("id", text(&device["id"])),
        ("status", text(&device["status"])),
        ("identity key", text(&device["identity_key"])),
        ("claimed with", text(&device["claim_id"])),
        ("created", time_ms(&device["created_at_ms"])),
        ("last seen", time_ms(&device["last_seen_at_ms"])),
        ("revoked", time_ms(&device["revoked_at_ms"])),
        ("hardware", text(&device["info"]["hardware_model"])),
        ("chip", text(&device["info"]["chip"])),
        ("firmware", firmware(&device["info"])),
        ("acked through", text(&device["acked_through"])),
        ("queue", format!("{}..{}", device["queue_floor"], device["queue_next"])),
        ("battery mV", text(&health["battery_mv"])),
        ("tags", text(&device["tags"])),
        ("groups", text(&device["groups"])),
        ("site", text(&device["deployment"]["site"])),
        ("desired config", text(&device["desired_config"]["version"])),
        ("reported config", text(&device["reported_config"]["version"])),
    ]
}

async fn claim_tokens(client: &ApiClient, command: ClaimTokensCommand, as_json: bool) -> Result<String> {
    match command {
        ClaimTokensCommand::Create { uses, expires_in_s, label } => {
            let body = json!({ "uses": uses, "expires_in_s": expires_in_s, "label": label });
            let body = without_nulls(body);
            let created = client
                .send(Method::POST, "/claim-tokens", Some(&body))
                .await?;
            if as_json {
                return Ok(format!("{}\n", pretty(&created)));
            }
            let info = &created["claim_token"];
            Ok(format!(
                "{}\n(claim token {}: {} use(s), expires {}; shown once, keep it safe)\n",
                text(&created["token"]),
                text(&info["id"]),
                text(&info["uses_max"]),
                time_ms(&info["expires_at_ms"])
            ))
        }
        ClaimTokensCommand::List(page) => {
            let page = client.get("/claim-tokens", &page).await?;
            Ok(list_output(&page, as_json, claim_token_table))
        }
        ClaimTokensCommand::Revoke { id } => {
            let path = format!("/claim-tokens/{}/revoke", segment(&id));
            let token = client.send(Method::POST, &path, None).await?;
            Ok(list_output(&json!({ "items": [token] }), as_json, claim_token_table))
        }
    }
}

/// Drops the `null` members of an object (optional fields left out).
pub(super) fn without_nulls(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.retain(|_, member| !member.is_null());
    }
    value
}

fn claim_token_table(items: &[Value]) -> Table {
    let mut table = Table::new(&["ID", "USES", "EXPIRES", "REVOKED", "LABEL"]);
    for token in items {
        table.row(vec![
            text(&token["id"]),
            format!("{}/{}", token["uses"], token["uses_max"]),
            time_ms(&token["expires_at_ms"]),
            time_ms(&token["revoked_at_ms"]),
            text(&token["label"]),
        ]);
    }
    table
}

fn detection_table(items: &[Value]) -> Table {
    let mut table =
        Table::new(&["DEVICE", "SEQ", "CAPTURED", "TRIGGER", "CLASSES", "BBOX", "IMAGE", "BATTERY mV"]);
    for detection in items {
        table.row(vec![
            text(&detection["device_id"]),
            text(&detection["seq"]),
            time_s(&detection["captured_at_s"]),
            text(&detection["trigger"]),
            classes(&detection["classes"]),
            if detection["bbox"].is_null() { "-".into() } else { "yes".into() },
            format!("{} B", detection["image_len"]),
            text(&detection["battery_mv"]),
        ]);
    }
    table
}

/// `label@confidence%` for each classifier result.
fn classes(value: &Value) -> String {
    let list: Vec<String> = value
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| format!("{}@{}%", c["label"], c["confidence_pct"]))
        .collect();
    if list.is_empty() { "-".into() } else { list.join(",") }
}

fn health_table(items: &[Value]) -> Table {
    let mut table = Table::new(&[
        "TAKEN",
        "BATTERY mV",
        "SOC %",
        "CHARGE",
        "SOLAR mW",
        "TEMP °C",
        "FREE KiB",
        "RSSI",
        "QUEUE",
        "DROPPED",
    ]);
    for stored in items {
        let health = &stored["health"];
        let decicelsius = health["temperature_decicelsius"]
            .as_i64()
            .unwrap_or_default();
        table.row(vec![
            time_s(&health["taken_at"]),
            text(&health["battery_mv"]),
            text(&health["battery_soc_pct"]),
            text(&health["charge_state"]),
            text(&health["solar_mw"]),
            format!("{:.1}", decicelsius as f64 / 10.0),
            text(&health["storage_free_kib"]),
            text(&health["rssi_dbm"]),
            text(&health["queue_depth"]),
            text(&health["queue_dropped_total"]),
        ]);
    }
    table
}

async fn config(client: &ApiClient, command: ConfigCommand, as_json: bool) -> Result<String> {
    match command {
        ConfigCommand::Get { id } => {
            let config = client
                .get(&format!("/devices/{}/config", segment(&id)), &())
                .await?;
            if as_json {
                return Ok(format!("{}\n", pretty(&config)));
            }
            Ok(config_table(&config["desired"], &config["reported"]).render())
        }
        ConfigCommand::Set { id, file } => {
            let body = read_json(&file)?;
            let path = format!("/devices/{}/config", segment(&id));
            let update = client.send(Method::PUT, &path, Some(&body)).await?;
            if as_json {
                return Ok(format!("{}\n", pretty(&update)));
            }
            let delivery = if update["published"] == json!(true) {
                "published: a connected trap gets it now, a sleeping one on its next hello"
            } else {
                "not published now: the trap gets it on its next hello"
            };
            Ok(format!("desired configuration version {} stored; {delivery}\n", update["desired"]["version"]))
        }
    }
}

fn read_json(file: &PathBuf) -> Result<Value> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))
}

/// One row per configuration field: desired next to reported.
fn config_table(desired: &Value, reported: &Value) -> Table {
    let mut table = Table::new(&["FIELD", "DESIRED", "REPORTED"]);
    table.row(vec!["version".into(), text(&desired["version"]), text(&reported["version"])]);
    table.row(vec![
        "set / received".into(),
        time_ms(&desired["set_at_ms"]),
        time_ms(&reported["received_at_ms"]),
    ]);
    table.row(vec!["status".into(), "-".into(), text(&reported["status"])]);
    let mut fields: Vec<&String> = Vec::new();
    for config in [&desired["config"], &reported["config"]] {
        for key in config.as_object().into_iter().flat_map(|c| c.keys()) {
            if !fields.contains(&key) {
                fields.push(key);
            }
        }
    }
    for field in fields {
        let cell = |config: &Value| config_cell(&config["config"][field.as_str()]);
        table.row(vec![field.clone(), cell(desired), cell(reported)]);
    }
    table
}

fn config_cell(value: &Value) -> String {
    match value {
        Value::Array(windows) if !windows.is_empty() => windows
            .iter()
            .map(|w| format!("{}-{}", w["start_min"], w["end_min"]))
            .collect::<Vec<_>>()
            .join(","),
        other => text(other),
    }
}

async fn commands(client: &ApiClient, command: CommandsCommand, as_json: bool) -> Result<String> {
    match command {
        CommandsCommand::Send { id, kind, seq, ttl_s } => {
            if matches!(kind, CommandKindArg::SendFullImage) != seq.is_some() {
                bail!("--seq goes with send-full-image, and only with it");
            }
            let body = without_nulls(json!({ "kind": kind.api_name(), "seq": seq, "ttl_s": ttl_s }));
            let path = format!("/devices/{}/commands", segment(&id));
            let queued = client.send(Method::POST, &path, Some(&body)).await?;
            if as_json {
                return Ok(format!("{}\n", pretty(&queued)));
            }
            let note = if queued["published"] == json!(true) {
                "queued and published: a connected trap gets it now, a sleeping one on its next hello"
            } else {
                "queued: the trap gets it on its next hello"
            };
            Ok(format!("command {} ({}) {note}\n", queued["command"]["id"], kind.api_name()))
        }
        CommandsCommand::List { id, page } => {
            let page = client
                .get(&format!("/devices/{}/commands", segment(&id)), &page)
                .await?;
            Ok(list_output(&page, as_json, command_table))
        }
    }
}

fn command_table(items: &[Value]) -> Table {
    let mut table = Table::new(&["ID", "KIND", "STATE", "RESULT", "DELIVERIES", "CREATED", "EXPIRES"]);
    for command in items {
        let kind = match command["seq"].as_u64() {
            Some(seq) => format!("{} {seq}", text(&command["kind"])),
            None => text(&command["kind"]),
        };
        table.row(vec![
            text(&command["id"]),
            kind,
            text(&command["state"]),
            text(&command["result"]),
            text(&command["deliveries"]),
            time_ms(&command["created_at_ms"]),
            time_ms(&command["expires_at_ms"]),
        ]);
    }
    table
}

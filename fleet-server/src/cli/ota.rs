//! `firmware ...` and `rollout ...`: uploads and rollouts over the API.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use super::client::ApiClient;
use super::operator::{PageArgs, list_output, object_output, without_nulls};
use super::output::{Table, json as pretty, text, time_ms};
use crate::ota::{MANIFEST_HEADER, base64_encode};

/// `firmware ...`.
#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Upload an image with its signed manifest (from `cargo xtask sign`).
    Upload {
        /// The firmware image.
        #[arg(long)]
        image: PathBuf,
        /// The signed manifest file.
        #[arg(long)]
        manifest: PathBuf,
    },
    /// List uploaded firmware, newest first.
    List(PageArgs),
}

/// `rollout ...`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Create a rollout of uploaded firmware and offer it.
    Create(RolloutCreateArgs),
    /// List rollouts, newest first.
    List(PageArgs),
    /// Show a rollout: counts and every target.
    Show {
        /// Rollout id.
        id: u32,
    },
    /// Stop new offers (downloads in progress continue).
    Pause {
        /// Rollout id.
        id: u32,
    },
    /// Offer again.
    Resume {
        /// Rollout id.
        id: u32,
    },
    /// End the rollout for good.
    Abort {
        /// Rollout id.
        id: u32,
    },
}

/// Flags of `rollout create`.
#[derive(Debug, Args)]
pub struct RolloutCreateArgs {
    /// Firmware id (see `firmware list`).
    #[arg(long)]
    firmware: u32,
    /// A target device (repeat for several).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Every active device of the firmware's chip running an older version.
    #[arg(long)]
    all: bool,
    /// Devices offered or downloading at once (server default: `[ota] max_in_flight`).
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// Failed or rolled-back devices that pause the rollout (server default).
    #[arg(long)]
    failure_threshold: Option<u32>,
}

/// Runs a `firmware` command.
pub async fn firmware(client: &ApiClient, command: FirmwareCommand, as_json: bool) -> Result<String> {
    match command {
        FirmwareCommand::Upload { image, manifest } => {
            let bytes = std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
            let signed =
                std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
            let answer = client
                .post_bytes("/firmware", bytes, (MANIFEST_HEADER, base64_encode(&signed)))
                .await?;
            if as_json {
                return Ok(format!("{}\n", pretty(&answer)));
            }
            let what = if answer["created"] == json!(true) { "uploaded" } else { "already stored" };
            let firmware = &answer["firmware"];
            Ok(format!("firmware {} {} ({what})\n", firmware["id"], version(&firmware["version"])))
        }
        FirmwareCommand::List(page) => {
            let page = client.get("/firmware", &page).await?;
            Ok(list_output(&page, as_json, firmware_table))
        }
    }
}

/// Runs a `rollout` command.
pub async fn rollout(client: &ApiClient, command: RolloutCommand, as_json: bool) -> Result<String> {
    let (method, path, body) = match command {
        RolloutCommand::Create(args) => {
            if args.devices.is_empty() && !args.all {
                bail!("name target devices with --device, or pass --all");
            }
            let body = without_nulls(json!({
                "firmware_id": args.firmware,
                "devices": args.devices,
                "all": args.all,
                "max_in_flight": args.max_in_flight,
                "failure_threshold": args.failure_threshold,
            }));
            (Method::POST, "/rollouts".to_owned(), Some(body))
        }
        RolloutCommand::List(page) => {
            let page = client.get("/rollouts", &page).await?;
            return Ok(list_output(&page, as_json, rollout_table));
        }
        RolloutCommand::Show { id } => (Method::GET, format!("/rollouts/{id}"), None),
        RolloutCommand::Pause { id } => (Method::POST, format!("/rollouts/{id}/pause"), None),
        RolloutCommand::Resume { id } => (Method::POST, format!("/rollouts/{id}/resume"), None),
        RolloutCommand::Abort { id } => (Method::POST, format!("/rollouts/{id}/abort"), None),
    };
    let rollout = client.send(method, &path, body.as_ref()).await?;
    let mut out = object_output(&rollout, as_json, &rollout_fields(&rollout));
    if let (false, Some(devices)) = (as_json, rollout["devices"].as_array()) {
        out.push_str(&target_table(devices).render());
    }
    Ok(out)
}

fn version(value: &Value) -> String {
    format!("{}.{}.{}", value["major"], value["minor"], value["patch"])
}

fn firmware_table(items: &[Value]) -> Table {
    let mut table = Table::new(&["ID", "VERSION", "CHIP", "SIZE", "SHA-256", "UPLOADED"]);
    for firmware in items {
        let sha = text(&firmware["sha256"]);
        table.row(vec![
            text(&firmware["id"]),
            version(&firmware["version"]),
            text(&firmware["chip"]),
            text(&firmware["size"]),
            sha.get(..16).unwrap_or(&sha).to_owned(),
            time_ms(&firmware["created_at_ms"]),
        ]);
    }
    table
}

/// `state=count` for every non-zero count.
fn counts(rollout: &Value) -> String {
    rollout["counts"]
        .as_object()
        .map(|counts| {
            counts
                .iter()
                .filter(|(_, n)| n.as_u64() != Some(0))
                .map(|(state, n)| format!("{state}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn rollout_table(items: &[Value]) -> Table {
    let mut table = Table::new(&["ID", "FIRMWARE", "VERSION", "STATE", "IN FLIGHT", "TARGETS", "CREATED"]);
    for rollout in items {
        table.row(vec![
            text(&rollout["id"]),
            text(&rollout["firmware_id"]),
            version(&rollout["version"]),
            text(&rollout["state"]),
            text(&rollout["max_in_flight"]),
            counts(rollout),
            time_ms(&rollout["created_at_ms"]),
        ]);
    }
    table
}

fn rollout_fields(rollout: &Value) -> Vec<(&'static str, String)> {
    vec![
        ("id", text(&rollout["id"])),
        (
            "firmware",
            format!(
                "{} ({} for {})",
                rollout["firmware_id"],
                version(&rollout["version"]),
                text(&rollout["chip"])
            ),
        ),
        ("state", text(&rollout["state"])),
        ("pause reason", text(&rollout["pause_reason"])),
        ("max in flight", text(&rollout["max_in_flight"])),
        ("failure threshold", text(&rollout["failure_threshold"])),
        ("targets", counts(rollout)),
        ("created", time_ms(&rollout["created_at_ms"])),
        ("updated", time_ms(&rollout["updated_at_ms"])),
    ]
}

fn target_table(devices: &[Value]) -> Table {
    let mut table = Table::new(&["DEVICE", "STATE", "OFFSET", "OUTCOME", "OFFERS", "UPDATED"]);
    for device in devices {
        table.row(vec![
            text(&device["device_id"]),
            text(&device["state"]),
            text(&device["offset"]),
            text(&device["outcome"]),
            text(&device["offers"]),
            time_ms(&device["updated_at_ms"]),
        ]);
    }
    table
}

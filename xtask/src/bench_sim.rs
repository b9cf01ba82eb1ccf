//! `cargo xtask bench-sim`: a simulator scenario against the release fleet
//! server, as `docs/benchmarks.md` records it (the 1M-detection day, the
//! 10,000-trap fleet).
//!
//! A benchmark, not a test: it prints the simulator's report and the server's
//! peak memory. Steps:
//!
//! 1. build `wildcam-fleet` and `wildcam-sim` in release mode;
//! 2. in a fresh temporary directory, on free loopback ports: create an admin
//!    API token, start `wildcam-fleet serve` with room for the scenario
//!    (connections, claim attempts per minute);
//! 3. run `wildcam-sim run SCENARIO` against it (provisioning through the
//!    claim protocol, the virtual day, the end-to-end check of every
//!    detection through the API) and print its report (`--report FILE` keeps
//!    the JSON);
//! 4. read the server's peak RSS, stop it (SIGTERM, then SIGKILL) and remove
//!    the directory (kept with `--keep`).
//!
//! An OTA rehearsal scenario (`[ota] enabled = true`) signs its image with
//! `[ota] signing_key`: the server is told to accept its public half
//! (`PATH.pub`), and a missing key pair is created first, as `cargo xtask
//! keygen --out PATH` would.
//!
//! Fails when the simulator's check fails (a detection lost, duplicated,
//! unknown or altered). Every child process is killed when this verb ends.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{
    WorkDir, build_release, check_server_env, print_machine, report_log, start_server, target_dir,
};
use crate::process;

/// Connections the server allows: the scenario's traps, plus provisioning
/// connections and headroom for reconnects.
const CONNECTION_HEADROOM: u32 = 2_000;

/// Flags of `cargo xtask bench-sim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A scenario of `simulator/scenarios/` by name (`million-day`,
    /// `fleet-10k`, ...) or a path to a scenario file.
    #[arg(default_value = "million-day")]
    scenario: String,
    /// Override the scenario's `fleet.traps`.
    #[arg(long)]
    traps: Option<u32>,
    /// Stop the simulator after this many seconds, whatever happened.
    #[arg(long, default_value_t = 1_800)]
    timeout_s: u64,
    /// Also write the simulator's JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Extra server settings as `WILDCAM__...=value` (repeatable).
    #[arg(long = "server-env", value_name = "VAR=VALUE")]
    server_env: Vec<String>,
    /// Keep the temporary directory (database, server log, simulator state).
    #[arg(long)]
    keep: bool,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    check_server_env(&args.server_env)?;
    let root = crate::repository_root();
    let scenario = scenario_path(&root, &args.scenario)?;
    let facts = ScenarioFacts::read(&scenario)?;
    let traps = args.traps.unwrap_or(facts.traps);
    let ota_public_key = match &facts.ota_signing_key {
        Some(key) => Some(ensure_key_pair(key)?),
        None => None,
    };
    build(&root)?;
    let release = target_dir(&root).join("release");
    let work = WorkDir::create("wildcam-bench-sim", args.keep)?;
    print_machine();

    let server = release.join("wildcam-fleet");
    let data_dir = work.path.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let token = process::output(
        Command::new(&server)
            .args(["token", "create", "--role", "admin", "--label", "bench-sim", "--data-dir"])
            .arg(&data_dir),
    )?;
    let log_path = work.path.join("server.log");
    let mut settings = vec![
        ("WILDCAM__MQTT__MAX_CONNECTIONS", (traps + CONNECTION_HEADROOM).to_string()),
        // Every trap claims once, all within the first minute or two.
        ("WILDCAM__PROVISIONING__ATTEMPTS_PER_MINUTE", (traps * 6).max(6_000).to_string()),
    ];
    if let Some(public_key) = ota_public_key {
        settings.push(("WILDCAM__OTA__SIGNING_KEYS", public_key));
    }
    let (mut child, [mqtt, _, http]) =
        start_server(&server, &data_dir, &log_path, &settings, &args.server_env)?;

    let mut sim = Command::new(release.join("wildcam-sim"));
    sim.arg("run")
        .arg(&scenario)
        .args(["--mqtt", &mqtt.to_string(), "--http", &http.to_string()])
        .args(["--timeout-s", &args.timeout_s.to_string()])
        .arg("--state-dir")
        .arg(work.path.join("sim-state"))
        .env("WILDCAM_TOKEN", token.trim());
    if let Some(traps) = args.traps {
        sim.args(["--traps", &traps.to_string()]);
    }
    if let Some(report) = &args.report {
        sim.arg("--report").arg(report);
    }
    eprintln!("xtask: {}", process::display(&sim).replace(token.trim(), "…"));
    let result = process::run(&mut sim)
        .context("the simulation failed or its check found lost, duplicated or altered detections")
        .and_then(|()| {
            child
                .check_running()
                .context("the server died during the run")
        });
    match peak_rss_mib(child.pid()) {
        Some(mib) => println!("server peak RSS: {mib:.0} MiB"),
        None => eprintln!("xtask: could not read the server's peak RSS"),
    }
    child.stop()?;
    report_log(&log_path, result.is_err());
    result
}

/// `name` in `simulator/scenarios/` (with or without `.toml`), or a path.
fn scenario_path(root: &Path, name: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(name);
    if as_path.is_file() {
        return Ok(as_path);
    }
    let dir = root.join("simulator").join("scenarios");
    let file = dir.join(if name.ends_with(".toml") { name.to_owned() } else { format!("{name}.toml") });
    if file.is_file() {
        return Ok(file);
    }
    let mut known: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|entry| {
                    let name = entry.ok()?.file_name().into_string().ok()?;
                    name.strip_suffix(".toml").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    known.sort();
    bail!("no scenario {name:?}: give a file or one of {}", known.join(", "))
}

/// What the verb needs from the scenario (the simulator validates the rest).
struct ScenarioFacts {
    /// `fleet.traps`.
    traps: u32,
    /// `[ota] signing_key`, resolved against the scenario's directory, when
    /// the scenario rehearses a rollout.
    ota_signing_key: Option<PathBuf>,
}

impl ScenarioFacts {
    fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
        let value: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not TOML", path.display()))?;
        let traps = value
            .get("fleet")
            .and_then(|fleet| fleet.get("traps"))
            .and_then(toml::Value::as_integer)
            .unwrap_or(1_000);
        let traps =
            u32::try_from(traps).with_context(|| format!("{}: fleet.traps out of range", path.display()))?;
        let ota = value.get("ota");
        let enabled = ota
            .and_then(|ota| ota.get("enabled"))
            .and_then(toml::Value::as_bool)
            .unwrap_or(false);
        let ota_signing_key = match ota
            .and_then(|ota| ota.get("signing_key"))
            .and_then(toml::Value::as_str)
        {
            Some(key) if enabled => Some(path.parent().unwrap_or(Path::new(".")).join(key)),
            _ => None,
        };
        Ok(Self { traps, ota_signing_key })
    }
}

/// The public key file of the signing key at `key` (created with its private
/// key, as `cargo xtask keygen` does, when neither exists).
fn ensure_key_pair(key: &Path) -> Result<String> {
    let public = crate::key::public_key_path(key);
    if !key.exists() && !public.exists() {
        eprintln!("xtask: no OTA signing key at {}: creating one for the rehearsal", key.display());
        crate::keygen::run(&crate::keygen::Args { out: key.to_path_buf(), force: false })?;
    }
    if !public.exists() {
        bail!("{} is missing: the server needs the public half of {}", public.display(), key.display());
    }
    public
        .to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", public.display()))
}

fn build(root: &Path) -> Result<()> {
    build_release(root, "the server and the simulator", &["-p", "wildcam-simulator", "--bin", "wildcam-sim"])
}

/// The process's peak resident set (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

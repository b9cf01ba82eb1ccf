//! `wildcam-sim`: runs a scenario of virtual traps against a fleet server or
//! any MQTT broker and prints the report. See the crate README.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use wildcam_simulator::scenario::Compression;
use wildcam_simulator::{Options, Scenario, Simulation, Target};

/// Virtual WildCAM traps over MQTT, for load tests and rehearsals.
#[derive(Debug, Parser)]
#[command(name = "wildcam-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario and print the report.
    Run(Box<RunArgs>),
    /// Parse and validate scenario files.
    Check {
        /// Scenario files.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The scenario (TOML).
    scenario: PathBuf,
    /// Override `fleet.traps`.
    #[arg(long)]
    traps: Option<u32>,
    /// Override `seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Override `time.duration_h`.
    #[arg(long)]
    duration_h: Option<f64>,
    /// Override `time.compression`: a factor or `max`.
    #[arg(long)]
    compression: Option<String>,
    /// The broker's MQTT 3.1.1 listener.
    #[arg(long, default_value = "127.0.0.1:18830")]
    mqtt: SocketAddr,
    /// The fleet server's HTTP listener (operator API).
    #[arg(long, default_value = "127.0.0.1:18080")]
    http: SocketAddr,
    /// An operator API token (admin to create claim tokens; read-only is
    /// enough with --claim-token or when every trap is already provisioned).
    #[arg(long, env = "WILDCAM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Password of the shared `provision` MQTT account.
    #[arg(
        long,
        env = "WILDCAM_PROVISION_PASSWORD",
        default_value = "wildcam-provisioning",
        hide_env_values = true
    )]
    provision_password: String,
    /// Claim tokens to use instead of creating them (repeatable).
    #[arg(long = "claim-token")]
    claim_tokens: Vec<String>,
    /// Traps claimed per claim token (its number of uses). The server limits claim
    /// requests per trap and overall, and failed proofs per token.
    #[arg(long, default_value_t = 1_000)]
    claims_per_token: u32,
    /// Target a plain MQTT broker instead of the fleet server: no provisioning,
    /// the broker's PUBACK releases the queue, nothing is checked end to end.
    #[command(flatten)]
    plain: PlainArgs,
    /// Where provisioned credentials are kept between runs.
    #[arg(long, default_value = "wildcam-sim-state")]
    state_dir: PathBuf,
    /// Keep no state: provision fresh identities every run.
    #[arg(long)]
    no_state: bool,
    /// Print the report as JSON on standard output instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Stop after this many seconds, whatever happened.
    #[arg(long, default_value_t = 3_600)]
    timeout_s: u64,
}

#[derive(Debug, Args)]
struct PlainArgs {
    /// Talk to a plain MQTT broker at --mqtt.
    #[arg(long)]
    plain: bool,
    /// Username for a plain broker.
    #[arg(long, requires = "plain")]
    username: Option<String>,
    /// Password for a plain broker.
    #[arg(long, requires = "username", env = "WILDCAM_SIM_BROKER_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Check { scenarios } => check(&scenarios),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|runtime| runtime.block_on(run(*args))),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn check(paths: &[PathBuf]) -> Result<bool> {
    for path in paths {
        let scenario = Scenario::load(path)?;
        println!(
            "{}: ok ({}, ~{:.0} detections expected)",
            path.display(),
            scenario.name,
            scenario.expected_detections()
        );
    }
    Ok(true)
}

fn scenario(args: &RunArgs) -> Result<Scenario> {
    let mut scenario = Scenario::load(&args.scenario)?;
    if let Some(traps) = args.traps {
        scenario.fleet.traps = traps;
    }
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    if let Some(hours) = args.duration_h {
        scenario.time.duration_h = hours;
    }
    if let Some(compression) = &args.compression {
        scenario.time.compression = match compression.parse::<f64>() {
            Ok(factor) => Compression::Factor(factor),
            Err(_) => Compression::Word(compression.clone()),
        };
    }
    scenario.validate(" (after command-line overrides)")?;
    Ok(scenario)
}

async fn run(args: RunArgs) -> Result<bool> {
    let scenario = scenario(&args)?;
    let target = if args.plain.plain {
        let credentials = args
            .plain
            .username
            .clone()
            .map(|u| (u, args.plain.password.clone().unwrap_or_default()));
        Target::Plain { mqtt: args.mqtt, credentials }
    } else {
        let Some(token) = args.token.clone() else {
            bail!(
                "--token (or WILDCAM_TOKEN) is needed to talk to the fleet server; create one with `wildcam-fleet token create --role admin`"
            );
        };
        Target::Fleet {
            mqtt: args.mqtt,
            http: args.http,
            api_token: token,
            provision_password: args.provision_password.clone(),
            claim_tokens: args.claim_tokens.clone(),
            claims_per_token: args.claims_per_token,
        }
    };
    let options = Options {
        scenario,
        target,
        state_dir: (!args.no_state).then(|| args.state_dir.clone()),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        timeout: Duration::from_secs(args.timeout_s),
    };
    let simulation = Simulation::prepare(options).await?;
    let report = simulation.run().await?;
    if let Some(path) = &args.report {
        std::fs::write(path, report.to_json()).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(report.ok || args.plain.plain)
}

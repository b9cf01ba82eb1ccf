//! The `wildcam-fleet` command line: `serve` runs the server; the operator
//! commands call its HTTP API (`client.rs`, printed by `output.rs`);
//! `token create` bootstraps an API token directly in the data directory;
//! `demo-trap` is a throwaway trap for demos.
//!
//! The binary (`src/bin/wildcam-fleet.rs`) only calls [`main`].

mod client;
mod demo_trap;
mod operator;
mod ota;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

pub use client::ApiClient;
pub use demo_trap::DemoTrapArgs;
use operator::{
    ApiArgs, ClaimTokensCommand, CommandsCommand, ConfigCommand, DetectionsCommand, DevicesCommand,
    HealthArgs, OperatorCommand,
};
pub use output::{Table, utc};

use crate::config::{Config, LogFormat};
use crate::server::Server;
use crate::store::{ApiRole, ApiTokenStore, SqliteConfig, SqliteStore, Store};

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "wildcam-fleet", version, about = "WildCAM fleet server and operator tools")]
pub struct Cli {
    /// Configuration file (TOML); `WILDCAM__*` variables override it
    /// (`serve` and `token create`).
    #[arg(long, global = true, env = "WILDCAM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve,
    /// Operator API tokens, created directly in the data directory (works
    /// while the server runs): the way to get the first admin token.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The device registry.
    Devices {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Claim tokens for new traps.
    ClaimTokens {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ClaimTokensCommand,
    },
    /// Stored detections.
    Detections {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: DetectionsCommand,
    },
    /// A device's health reports.
    Health {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        args: HealthArgs,
    },
    /// Desired and reported configuration.
    Config {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Commands for traps.
    Commands {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: CommandsCommand,
    },
    /// Firmware images for OTA updates.
    Firmware {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ota::FirmwareCommand,
    },
    /// OTA rollouts of uploaded firmware.
    Rollout {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ota::RolloutCommand,
    },
    /// Claim a throwaway trap with a claim token and send detections.
    DemoTrap(DemoTrapArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (once).
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
struct TokenCreateArgs {
    /// What the token may do.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// A note: who or what uses it.
    #[arg(long, default_value = "")]
    label: String,
    /// The data directory (default: from the configuration).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Everything.
    Admin,
    /// GET routes only.
    #[value(alias = "read_only")]
    ReadOnly,
}

/// Parses the command line, runs the command, and maps the outcome to an
/// exit code (2: bad configuration, 1: the command failed).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let Some(config) = load_config(cli.config.as_deref()) else {
                return Ok(ExitCode::from(2));
            };
            init_logging(&config);
            serve(config).await?;
        }
        Command::Token { command: TokenCommand::Create(args) } => {
            let Some(config) = load_config(cli.config.as_deref()) else {
                return Ok(ExitCode::from(2));
            };
            create_token(&config, args).await?;
        }
        Command::Devices { api, command } => operator::run(&api, OperatorCommand::Devices(command)).await?,
        Command::ClaimTokens { api, command } => {
            operator::run(&api, OperatorCommand::ClaimTokens(command)).await?
        }
        Command::Detections { api, command } => {
            operator::run(&api, OperatorCommand::Detections(command)).await?
        }
        Command::Health { api, args } => operator::run(&api, OperatorCommand::Health(args)).await?,
        Command::Config { api, command } => operator::run(&api, OperatorCommand::Config(command)).await?,
        Command::Commands { api, command } => operator::run(&api, OperatorCommand::Commands(command)).await?,
        Command::Firmware { api, command } => operator::run(&api, OperatorCommand::Firmware(command)).await?,
        Command::Rollout { api, command } => operator::run(&api, OperatorCommand::Rollout(command)).await?,
        Command::DemoTrap(args) => demo_trap::run(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The configuration, or `None` after printing why it is unusable.
fn load_config(file: Option<&std::path::Path>) -> Option<Config> {
    match Config::load(file) {
        Ok(config) => Some(config),
        Err(error) => {
            eprintln!("error: {error}");
            None
        }
    }
}

async fn serve(config: Config) -> Result<()> {
    let server = Server::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: committing what is in hand");
    server.shutdown().await
}

/// Opens the store on the data directory (SQLite in WAL mode allows this
/// next to a running server), creates the token and prints it once.
async fn create_token(config: &Config, args: TokenCreateArgs) -> Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(|| config.data_dir.clone());
    let store = SqliteStore::open(SqliteConfig::new(data_dir.clone()))
        .await
        .with_context(|| format!("opening the store in {}", data_dir.display()))?;
    let role = match args.role {
        RoleArg::Admin => ApiRole::Admin,
        RoleArg::ReadOnly => ApiRole::ReadOnly,
    };
    let created = store.create_api_token(role, args.label).await;
    store.close().await.context("closing the store")?;
    let created = created.context("creating the token")?;
    println!("{}", created.token);
    let role = match created.info.role {
        ApiRole::Admin => "admin",
        ApiRole::ReadOnly => "read_only",
    };
    eprintln!(
        "(API token {} with role {role} created; shown once: pass it as --token or WILDCAM_TOKEN)",
        created.info.id
    );
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn api_flags_go_after_the_subcommand_and_demo_token_is_the_claim_token() {
        let cli =
            Cli::try_parse_from(["wildcam-fleet", "devices", "list", "--json", "--token", "wcat_x"]).unwrap();
        let Command::Devices { api, .. } = cli.command else {
            panic!("devices")
        };
        assert!(api.json);
        assert_eq!(api.token.as_deref(), Some("wcat_x"));
        let cli = Cli::try_parse_from(["wildcam-fleet", "demo-trap", "--token", "abc.def", "--count", "2"])
            .unwrap();
        let Command::DemoTrap(args) = cli.command else {
            panic!("demo-trap")
        };
        assert_eq!((args.claim_token.as_str(), args.count), ("abc.def", 2));
        let cli = Cli::try_parse_from(["wildcam-fleet", "token", "create", "--role", "read_only"]).unwrap();
        assert!(matches!(cli.command, Command::Token { .. }));
        let cli = Cli::try_parse_from([
            "wildcam-fleet",
            "rollout",
            "create",
            "--firmware",
            "3",
            "--device",
            "wc-1",
            "--device",
            "wc-2",
            "--max-in-flight",
            "2",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Rollout { .. }));
        let cli = Cli::try_parse_from([
            "wildcam-fleet",
            "firmware",
            "upload",
            "--image",
            "fw.bin",
            "--manifest",
            "fw.manifest",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Firmware { .. }));
        assert!(Cli::try_parse_from(["wildcam-fleet", "rollout", "pause", "7"]).is_ok());
    }
}

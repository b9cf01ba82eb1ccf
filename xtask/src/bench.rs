//! `cargo xtask bench-ingest`: sustained durable ingest from many connected MQTT
//! clients, or the same load through Mosquitto for the reference cost of a broker.
//!
//! A benchmark, not a test: it prints figures (recorded in `docs/benchmarks.md`).
//! Steps:
//!
//! 1. build `wildcam-fleet` and the load generator (`fleet-server/examples/ingest_bench.rs`)
//!    in release mode;
//! 2. in a fresh temporary directory, on free loopback ports: for `--broker fleet`,
//!    register the bench devices straight in the store (`ingest_bench prepare`), then start
//!    `wildcam-fleet serve` on it; for `--broker mosquitto`, start Mosquitto with a
//!    temporary configuration (installed with apt-get when missing and running as root);
//! 3. run the generator (`ingest_bench run`), which connects the clients, warms up,
//!    measures and prints the report (throughput, latency, broker CPU per thread and
//!    memory, the server's `/metrics`);
//! 4. stop the broker (SIGTERM, then SIGKILL after a grace period) and remove the
//!    directory (kept with `--keep`, e.g. to read the server log).
//!
//! Every child process is killed when this verb ends, whatever happened.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process;
use crate::toolchain::host_cargo;

/// Longest wait for a broker to accept connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a broker to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Where Debian installs Mosquitto.
const MOSQUITTO_DEBIAN: &str = "/usr/sbin/mosquitto";

/// What the clients talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broker {
    /// The fleet server: embedded rumqttd, ingest, SQLite, sealed acks after commit.
    Fleet,
    /// Mosquitto with one plain subscriber and no storage.
    Mosquitto,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Fleet => "fleet",
            Broker::Mosquitto => "mosquitto",
        }
    }
}

/// Flags of `cargo xtask bench-ingest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Connected MQTT clients (one bench device each).
    #[arg(long, default_value_t = 1_000)]
    clients: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// What the clients talk to.
    #[arg(long, value_enum, default_value_t = Broker::Fleet)]
    broker: Broker,
    /// Detections in flight per client (the SDK queue's window).
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    generator_threads: usize,
    /// Extra server settings as `WILDCAM__...=value` (repeatable), e.g.
    /// `--server-env WILDCAM__INGEST__BATCH_LEN_MAX=4000`.
    #[arg(long = "server-env", value_name = "VAR=VALUE")]
    server_env: Vec<String>,
    /// Keep the temporary directory (database, logs, configuration) and print its path.
    #[arg(long)]
    keep: bool,
}

/// A child process killed (SIGKILL) and reaped on drop.
pub(crate) struct Guarded {
    child: Child,
    name: &'static str,
}

impl Guarded {
    fn spawn(command: &mut Command, name: &'static str) -> Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("could not start `{}`", process::display(command)))?;
        Ok(Self { child, name })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }

    /// SIGTERM (a clean shutdown), then SIGKILL if it has not exited in time.
    pub(crate) fn stop(mut self) -> Result<()> {
        let pid = self.pid().to_string();
        if process::succeeds(Command::new("kill").args(["-TERM", &pid])) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Some(status) = self.child.try_wait()? {
                    eprintln!("xtask: {} stopped ({status})", self.name);
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("xtask: {} ignored SIGTERM for {STOP_TIMEOUT:?}; killing it", self.name);
        }
        Ok(())
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A directory removed on drop unless kept.
pub(crate) struct WorkDir {
    pub(crate) path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// `$TMPDIR/{prefix}-{pid}`, emptied first.
    pub(crate) fn create(prefix: &str, keep: bool) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("xtask: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    check_server_env(&args.server_env)?;
    let root = crate::repository_root();
    build(&root)?;
    let release = target_dir(&root).join("release");
    let generator = release.join("examples").join("ingest_bench");
    let work = WorkDir::create("wildcam-bench-ingest", args.keep)?;
    print_machine();
    match args.broker {
        Broker::Fleet => bench_fleet(args, &release.join("wildcam-fleet"), &generator, &work.path),
        Broker::Mosquitto => bench_mosquitto(args, &generator, &work.path),
    }
}

/// Refuses `--server-env` values that are not `WILDCAM__...=value`.
pub(crate) fn check_server_env(settings: &[String]) -> Result<()> {
    for setting in settings {
        if !setting.starts_with("WILDCAM__") || !setting.contains('=') {
            bail!("--server-env takes WILDCAM__...=value, not {setting:?}");
        }
    }
    Ok(())
}

/// Sets checked `--server-env` values on the server's command.
fn apply_server_env(command: &mut Command, settings: &[String]) {
    for setting in settings {
        if let Some((name, value)) = setting.split_once('=') {
            command.env(name, value);
        }
    }
}

fn build(root: &Path) -> Result<()> {
    build_release(root, "the server and the load generator", &["--example", "ingest_bench"])
}

/// `cargo build --release` of `wildcam-fleet` and `more` (package, binary or
/// example flags) in the workspace at `root`.
pub(crate) fn build_release(root: &Path, what: &str, more: &[&str]) -> Result<()> {
    eprintln!("xtask: building {what} (release)");
    process::run(
        host_cargo()
            .current_dir(root)
            .args(["build", "--release", "--quiet", "-p", "wildcam-fleet-server", "--bin", "wildcam-fleet"])
            .args(more),
    )
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/`).
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn bench_fleet(args: &Args, server: &Path, generator: &Path, work: &Path) -> Result<()> {
    let data_dir = work.join("data");
    let clients = args.clients.to_string();
    process::run(
        Command::new(generator)
            .args(["prepare", "--clients", &clients])
            .arg("--data-dir")
            .arg(&data_dir),
    )?;
    let log_path = work.join("server.log");
    let (mut child, [mqtt, _, http]) = start_server(server, &data_dir, &log_path, &[], &args.server_env)?;
    let result = run_generator(args, generator, mqtt, Some(http), child.pid()).and_then(|()| {
        child
            .check_running()
            .context("the server died during the run")
    });
    child.stop()?;
    report_log(&log_path, result.is_err());
    result
}

/// Starts `wildcam-fleet serve` on `data_dir` and three free loopback ports
/// (MQTT 3.1.1, MQTT 5, HTTP), logging warnings to `log_path`, with
/// `settings` and then the user's `--server-env` values; returns once it
/// accepts MQTT and HTTP connections.
pub(crate) fn start_server(
    server: &Path,
    data_dir: &Path,
    log_path: &Path,
    settings: &[(&str, String)],
    server_env: &[String],
) -> Result<(Guarded, [SocketAddr; 3])> {
    let ports @ [mqtt, mqtt_v5, http] = free_ports()?;
    let log = std::fs::File::create(log_path).context("server log")?;
    let mut command = Command::new(server);
    command
        .arg("serve")
        .env("WILDCAM__DATA_DIR", data_dir)
        .env("WILDCAM__MQTT__LISTEN_V4", mqtt.to_string())
        .env("WILDCAM__MQTT__LISTEN_V5", mqtt_v5.to_string())
        .env("WILDCAM__HTTP__LISTEN", http.to_string())
        .env("WILDCAM__LOG__FILTER", "warn");
    for (name, value) in settings {
        command.env(name, value);
    }
    apply_server_env(&mut command, server_env);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    eprintln!("xtask: {}", process::display(&command));
    let mut child = Guarded::spawn(&mut command, "wildcam-fleet")?;
    wait_accepting(&mut child, mqtt)?;
    wait_accepting(&mut child, http)?;
    Ok((child, ports))
}

fn bench_mosquitto(args: &Args, generator: &Path, work: &Path) -> Result<()> {
    let mosquitto = find_or_install_mosquitto()?;
    let [port] = free_ports()?;
    let config = work.join("mosquitto.conf");
    let log_path = work.join("mosquitto.log");
    std::fs::write(&config, mosquitto_config(port)).context("writing the Mosquitto configuration")?;
    let log = std::fs::File::create(&log_path).context("mosquitto log")?;
    let mut command = Command::new(&mosquitto);
    command.arg("-c").arg(&config);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    eprintln!("xtask: {} (configuration: {})", process::display(&command), config.display());
    let mut child = Guarded::spawn(&mut command, "mosquitto")?;
    wait_accepting(&mut child, port)?;
    let result = run_generator(args, generator, port, None, child.pid()).and_then(|()| {
        child
            .check_running()
            .context("mosquitto died during the run")
    });
    child.stop()?;
    report_log(&log_path, result.is_err());
    result
}

/// Anonymous clients on loopback only; the in-flight and queue limits raised so the
/// subscriber, not the configuration, is what bounds the delivery rate.
fn mosquitto_config(port: SocketAddr) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "# Written by `cargo xtask bench-ingest`.");
    let _ = writeln!(text, "listener {} {}", port.port(), port.ip());
    let _ = writeln!(text, "allow_anonymous true");
    let _ = writeln!(text, "persistence false");
    let _ = writeln!(text, "set_tcp_nodelay true");
    let _ = writeln!(text, "max_inflight_messages 1000");
    let _ = writeln!(text, "max_queued_messages 1000000");
    let _ = writeln!(text, "log_dest stderr");
    let _ = writeln!(text, "log_type error");
    let _ = writeln!(text, "log_type warning");
    text
}

fn find_or_install_mosquitto() -> Result<PathBuf> {
    if let Some(found) = find_mosquitto() {
        return Ok(found);
    }
    let is_root = process::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0");
    if !is_root || !process::succeeds(Command::new("apt-get").arg("--version")) {
        bail!("mosquitto is not installed; install Debian's package: `apt-get install mosquitto`");
    }
    eprintln!("xtask: mosquitto not found; installing Debian's package");
    let apt_get = || {
        let mut command = Command::new("apt-get");
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    process::run(apt_get().args(["install", "-y", "-qq", "mosquitto"]))?;
    find_mosquitto().context("mosquitto still not found after installing it")
}

fn find_mosquitto() -> Option<PathBuf> {
    if process::succeeds(Command::new("mosquitto").arg("-h")) {
        return Some(PathBuf::from("mosquitto"));
    }
    let debian = PathBuf::from(MOSQUITTO_DEBIAN);
    debian.exists().then_some(debian)
}

fn run_generator(
    args: &Args,
    generator: &Path,
    mqtt: SocketAddr,
    http: Option<SocketAddr>,
    pid: u32,
) -> Result<()> {
    let mut command = Command::new(generator);
    command
        .args(["run", "--broker", args.broker.name()])
        .args(["--mqtt", &mqtt.to_string()])
        .args(["--server-pid", &pid.to_string()])
        .args(["--clients", &args.clients.to_string()])
        .args(["--inflight", &args.inflight.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--threads", &args.generator_threads.to_string()]);
    if let Some(http) = http {
        command.args(["--http", &http.to_string()]);
    }
    eprintln!("xtask: {}", process::display(&command));
    process::run(&mut command)
}

/// `N` distinct free loopback ports: each listener is held until all are bound, so
/// the kernel cannot hand the same port out twice.
fn free_ports<const N: usize>() -> Result<[SocketAddr; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding a free port"))
        .collect::<Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|listener| listener.local_addr().context("reading a bound port"))
        .collect::<Result<Vec<_>>>()?;
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("bound {N} ports but read back a different count"))
}

fn wait_accepting(child: &mut Guarded, addr: SocketAddr) -> Result<()> {
    let started = Instant::now();
    loop {
        child.check_running()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if started.elapsed() > START_TIMEOUT {
            bail!("{} does not accept connections on {addr} after {START_TIMEOUT:?}", child.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The broker's log: its last lines on failure, else only its size.
pub(crate) fn report_log(path: &Path, failed: bool) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if failed {
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        eprintln!("xtask: last lines of {}:\n{}", path.display(), tail.join("\n"));
    } else if !text.is_empty() {
        eprintln!("xtask: the broker logged {} lines of warnings or errors", text.lines().count());
    }
}

/// The machine and how busy it is, for the record.
pub(crate) fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_gib = meminfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "machine: {cores} × {model}, {ram_gib:.0} GiB RAM; load average {} before the run",
        load.join(" ")
    );
}

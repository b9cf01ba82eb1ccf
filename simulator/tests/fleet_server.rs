//! The simulator against the real fleet server, restarted in the middle.
//!
//! Runs `scenarios/ci-restart.toml` (200 traps, ~20,000 detections, faults
//! on) against `wildcam-fleet serve` in a child process on free loopback
//! ports and a temporary data directory. Once about half the expected
//! detections are acknowledged, the server gets SIGKILL and is started again
//! on the same directory and ports; the traps reconnect through the SDK's
//! backoff and resend what was not acknowledged. The report, built from the
//! server's own API, must show zero lost and zero duplicated detections.
//!
//! The server binary is built with the cargo that builds this test (or taken
//! from `WILDCAM_FLEET_BIN`). Every wait is bounded; the server is killed
//! when the test ends, whatever happened.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, sleep};
use wildcam_simulator::{Options, Scenario, Simulation, Target};

/// Longest wait for the server to listen after a (re)start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the whole simulation may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);
/// How long the server stays down at the restart.
const DOWNTIME: Duration = Duration::from_millis(700);

/// Loopback ports chosen once and reused across the restart.
#[derive(Debug, Clone, Copy)]
struct Ports {
    mqtt_v4: u16,
    mqtt_v5: u16,
    http: u16,
}

impl Ports {
    fn free() -> Self {
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
            .collect();
        let port = |i: usize| listeners[i].local_addr().expect("local addr").port();
        Self { mqtt_v4: port(0), mqtt_v5: port(1), http: port(2) }
    }

    fn mqtt(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_v4))
    }

    fn http(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http))
    }
}

/// `wildcam-fleet`: from `WILDCAM_FLEET_BIN`, or built by the cargo that
/// built this test into the same target directory and profile.
fn fleet_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WILDCAM_FLEET_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target directory");
    let mut build = Command::new(env!("CARGO"));
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "-p", "wildcam-fleet-server", "--bin", "wildcam-fleet"])
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building wildcam-fleet failed: {status}");
    profile_dir.join("wildcam-fleet")
}

/// The server as a child process; SIGKILL on drop.
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    async fn start(binary: &Path, data_dir: &Path, ports: Ports, log: &Path) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(binary)
            .arg("serve")
            .env("WILDCAM__DATA_DIR", data_dir)
            .env("WILDCAM__MQTT__LISTEN_V4", format!("127.0.0.1:{}", ports.mqtt_v4))
            .env("WILDCAM__MQTT__LISTEN_V5", format!("127.0.0.1:{}", ports.mqtt_v5))
            .env("WILDCAM__HTTP__LISTEN", format!("127.0.0.1:{}", ports.http))
            .env("WILDCAM__LOG__FILTER", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("server binary starts");
        let mut server = Self { child, log: log.to_path_buf() };
        server.wait_listening(ports.mqtt()).await;
        server.wait_listening(ports.http()).await;
        server
    }

    async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("server exited with {status} before listening; log:\n{}", self.log_text());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "server not listening on {addr}; log:\n{}", self.log_text());
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An admin API token, created in the data directory before the server starts.
fn admin_token(binary: &Path, data_dir: &Path) -> String {
    let output = Command::new(binary)
        .args(["token", "create", "--role", "admin", "--label", "simulator test", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("token create runs");
    assert!(output.status.success(), "token create failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// A server in a child process on free ports with a fresh data directory,
/// and the simulator options to run `scenario` against it.
struct Harness {
    binary: PathBuf,
    dir: tempfile::TempDir,
    ports: Ports,
    server: ServerProcess,
    token: String,
}

impl Harness {
    async fn start() -> Self {
        let binary = fleet_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let ports = Ports::free();
        let token = admin_token(&binary, &data_dir);
        let server = ServerProcess::start(&binary, &data_dir, ports, &dir.path().join("server.log")).await;
        Self { binary, dir, ports, server, token }
    }

    fn options(&self, scenario: Scenario) -> Options {
        Options {
            scenario,
            target: Target::Fleet {
                mqtt: self.ports.mqtt(),
                http: self.ports.http(),
                api_token: self.token.clone(),
                provision_password: "wildcam-provisioning".into(),
                claim_tokens: Vec::new(),
                claims_per_token: 200,
            },
            state_dir: Some(self.dir.path().join("state")),
            progress: false,
            timeout: RUN_TIMEOUT,
        }
    }

    async fn restart(&mut self) {
        self.server.kill();
        sleep(DOWNTIME).await;
        let data_dir = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        self.server = ServerProcess::start(&self.binary, &data_dir, self.ports, &log).await;
    }

    /// SIGSTOP or SIGCONT to the server: a server that stops answering
    /// without closing a connection.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.server.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_day_through_a_server_restart_loses_and_duplicates_nothing() {
    let started = std::time::Instant::now();
    let mut harness = Harness::start().await;
    let scenario_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/ci-restart.toml");
    let scenario = Scenario::load(&scenario_path).expect("the CI scenario is valid");
    let expected = scenario.expected_detections();
    let simulation = Simulation::prepare(harness.options(scenario))
        .await
        .expect("fleet provisioned");
    let world = simulation.world();
    let run = tokio::spawn(simulation.run());

    // Restart once about half of the day's detections are acknowledged.
    let deadline = Instant::now() + RUN_TIMEOUT;
    while (world.counters.acked.load(Ordering::Relaxed) as f64) < expected / 2.0 {
        assert!(Instant::now() < deadline, "half the detections were never acknowledged");
        assert!(!run.is_finished(), "the run ended before the restart");
        sleep(Duration::from_millis(5)).await;
    }
    let acked_at_kill = world.counters.acked.load(Ordering::Relaxed);
    harness.restart().await;

    let report = tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .expect("the run ends in time")
        .expect("the run task")
        .expect("the run completes");
    eprintln!("{}", report.to_table());
    let check = report
        .detections
        .check
        .as_ref()
        .expect("checked against the server");
    assert!(report.detections.generated as f64 > expected * 0.8, "about 20,000 detections generated");
    assert!(acked_at_kill < report.detections.generated, "the restart came before the end");
    assert!(report.connections.lost > 0, "the restart cut connections");
    assert_eq!(check.lost, 0, "lost detections; server log:\n{}", harness.server.log_text());
    assert_eq!(check.duplicates, 0, "duplicated detections");
    assert_eq!(check.unknown, 0, "stored detections never generated");
    assert_eq!(check.mismatched, 0, "altered detections");
    assert_eq!(report.detections.dropped_by_full_queue, 0, "no queue overflowed");
    assert_eq!(check.stored, report.detections.generated, "every generated detection stored once");
    assert!(report.ok);
    eprintln!("simulator restart test took {:.1?}", started.elapsed());
}

/// A server that stops answering (SIGSTOP) while the day runs on at a fixed
/// compression: small queues overflow and drop their oldest records, some
/// never sent. The traps must tell the server their new floor (a hello after
/// an ack timeout) or its contiguous ack stays at the gap and they never
/// drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_whose_queues_overflowed_during_a_stall_still_drain() {
    let harness = Harness::start().await;
    let scenario = Scenario::parse(STALL_SCENARIO, "stall test").expect("the stall scenario is valid");
    let simulation = Simulation::prepare(harness.options(scenario))
        .await
        .expect("fleet provisioned");
    let world = simulation.world();
    let run = tokio::spawn(simulation.run());

    let deadline = Instant::now() + RUN_TIMEOUT;
    while world.counters.acked.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "nothing acknowledged");
        sleep(Duration::from_millis(5)).await;
    }
    harness.signal("STOP");
    sleep(STALL).await;
    harness.signal("CONT");

    let report = tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .expect("the run ends in time")
        .expect("the run task")
        .expect("the run completes");
    eprintln!("{}", report.to_table());
    let check = report
        .detections
        .check
        .as_ref()
        .expect("checked against the server");
    assert!(report.detections.dropped_by_full_queue > 0, "the stall overflowed queues");
    assert_eq!(check.lost, 0, "lost detections; server log:\n{}", harness.server.log_text());
    assert_eq!(check.duplicates, 0, "duplicated detections");
    assert_eq!(check.unknown, 0, "stored detections never generated");
    assert_eq!(check.mismatched, 0, "altered detections");
    assert!(report.ok);
    assert_eq!(world.counters.connected_now.load(Ordering::Relaxed), 0, "every trap drained and left");
}

/// How long the server is stopped in the stall test.
const STALL: Duration = Duration::from_secs(4);

/// 40 traps, ~16,000 detections over a day compressed into ~9 s, queues of 64.
const STALL_SCENARIO: &str = r#"
name = "stall"
seed = 7

[fleet]
traps = 40
sleepy_fraction = 0.0
queue_capacity = 64
inflight_max = 4

[time]
duration_h = 24.0
compression = 10000.0

[activity]
triggers_per_trap_per_day = 200.0
burst_len = 2

[faults]
drop_rate_per_day = 0.0
flaky_fraction = 0.0
reboot_rate_per_day = 0.0
clock_skew_fraction = 0.0

[network]
ack_timeout_ms = 1000
backoff_initial_ms = 100
backoff_max_ms = 1000
drain_timeout_s = 30
"#;

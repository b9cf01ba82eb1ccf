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
//! A second test rehearses an OTA rollout: 50 traps, a 64 KiB image signed
//! with a key generated into the temporary directory (PKCS#8 PEM for the
//! simulator, hex for the server), self-test failures, bootloader rollbacks
//! and reboots during downloads; every target must end final, the server's
//! counts must match the traps', and the registry must show the new version
//! for every confirmed trap.
//!
//! The server binary is built with the cargo that builds this test (or taken
//! from `WILDCAM_FLEET_BIN`). Every wait is bounded; the server is killed
//! when the test ends, whatever happened.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use tokio::time::{Instant, sleep};
use wildcam_simulator::api::ApiClient;
use wildcam_simulator::{EngineError, Options, Report, Scenario, Simulation, Target};

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
    build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--quiet",
        "-p",
        "wildcam-fleet-server",
        "--bin",
        "wildcam-fleet",
    ]);
    // The variables cargo set for this test (CARGO_MANIFEST_DIR, CARGO_PKG_…)
    // are tracked by some build scripts (ring's): inherited, they would make
    // every build here differ from a plain `cargo build` and rebuild the TLS
    // stack and the server each time.
    for (name, _) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(|n| n.starts_with("CARGO_") && n != "CARGO_HOME")
        {
            build.env_remove(name);
        }
    }
    build.env("CARGO_TARGET_DIR", target_dir);
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
    async fn start(binary: &Path, data_dir: &Path, ports: Ports, log: &Path, env: &[(&str, String)]) -> Self {
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
            .envs(env.iter().map(|(k, v)| (k, v)))
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
    /// Extra server settings (`WILDCAM__…`), kept across restarts.
    env: Vec<(&'static str, String)>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(tempfile::tempdir().expect("temp dir"), Vec::new()).await
    }

    /// A server that accepts firmware signed by a key generated into the
    /// temporary directory: `firmware.key` (PKCS#8 PEM, for the simulator);
    /// the server gets its public key in hex.
    async fn start_with_ota(env: &[(&'static str, &str)]) -> (Self, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = SigningKey::from_bytes(&[0x5a; 32]);
        let pem = key.to_pkcs8_pem(LineEnding::LF).expect("PEM");
        let key_path = dir.path().join("firmware.key");
        std::fs::write(&key_path, pem.as_bytes()).expect("key written");
        let public: String = key
            .verifying_key()
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut settings = vec![("WILDCAM__OTA__SIGNING_KEYS", public)];
        settings.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        (Self::start_with(dir, settings).await, key_path)
    }

    async fn start_with(dir: tempfile::TempDir, env: Vec<(&'static str, String)>) -> Self {
        let binary = fleet_binary();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let ports = Ports::free();
        let token = admin_token(&binary, &data_dir);
        let log = dir.path().join("server.log");
        let server = ServerProcess::start(&binary, &data_dir, ports, &log, &env).await;
        Self { binary, dir, ports, server, token, env }
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
        self.server = ServerProcess::start(&self.binary, &data_dir, self.ports, &log, &self.env).await;
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

/// Waits for the run's report and checks, against the server, that every
/// detection generated (and not dropped by a full queue) is stored exactly once.
async fn report_stored_exactly_once(
    harness: &Harness,
    run: tokio::task::JoinHandle<Result<Report, EngineError>>,
) -> Report {
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
    assert_eq!(check.lost, 0, "lost detections; server log:\n{}", harness.server.log_text());
    assert_eq!(check.duplicates, 0, "duplicated detections");
    assert_eq!(check.unknown, 0, "stored detections never generated");
    assert_eq!(check.mismatched, 0, "altered detections");
    report
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

    let report = report_stored_exactly_once(&harness, run).await;
    let check = report
        .detections
        .check
        .as_ref()
        .expect("checked against the server");
    assert!(report.detections.generated as f64 > expected * 0.8, "about 20,000 detections generated");
    assert!(acked_at_kill < report.detections.generated, "the restart came before the end");
    assert!(report.connections.lost > 0, "the restart cut connections");
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

    let report = report_stored_exactly_once(&harness, run).await;
    assert!(report.detections.dropped_by_full_queue > 0, "the stall overflowed queues");
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

/// 50 traps (a fifth sleepy) through two compressed hours with a rollout of a
/// 64 KiB image from a quarter of an hour in: 10 % of the new images fail
/// their self-test, 4 % are killed before confirming, and every trap reboots
/// about every 1.25 s real time, so some reboots land in downloads (64
/// chunk round trips each) and some between activation and self-test.
const OTA_SCENARIO: &str = r#"
name = "ota-ci"
seed = 424_242

[fleet]
traps = 50
sleepy_fraction = 0.2
checkin_interval_s = 600

[time]
duration_h = 2.0
compression = 720.0

[activity]
triggers_per_trap_per_day = 120.0
burst_len = 2

[faults]
drop_rate_per_day = 12.0
flaky_fraction = 0.0
reboot_rate_per_day = 96.0
clock_skew_fraction = 0.0

[network]
ack_timeout_ms = 1500
backoff_initial_ms = 100
backoff_max_ms = 1000
drain_timeout_s = 40

[ota]
enabled = true
signing_key = "KEY"
image_kib = 64
start_h = 0.25
max_in_flight = 25
failure_threshold = 50
self_test_failure_rate = 0.1
bootloader_rollback_rate = 0.04
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ota_rollout_reaches_every_trap_and_the_server_agrees() {
    let started = std::time::Instant::now();
    let settings = [("WILDCAM__OTA__STALL_TIMEOUT_S", "10")];
    let (harness, key) = Harness::start_with_ota(&settings).await;
    let text = OTA_SCENARIO.replace("KEY", &key.display().to_string());
    let scenario = Scenario::parse(&text, "OTA test").expect("the OTA scenario is valid");
    let simulation = Simulation::prepare(harness.options(scenario))
        .await
        .expect("fleet provisioned, image uploaded");
    let report = report_stored_exactly_once(&harness, tokio::spawn(simulation.run())).await;
    let log = || harness.server.log_text();

    let ota = report.ota.as_ref().expect("an OTA section");
    let server = ota.server.as_ref().expect("the rollout read back");
    assert!(ota.all_final, "every target final: {server:?}; server log:\n{}", log());
    assert!(ota.counts_agree, "server and traps agree: {ota:?}");
    assert_eq!(server.state, "completed", "{server:?}");
    assert_eq!(ota.without_result, 0, "every trap delivered its result");
    assert_eq!(ota.targets, 50);
    assert_eq!(
        ota.confirmed + ota.rolled_back_self_test + ota.rolled_back_bootloader,
        50,
        "confirmed or rolled back, nothing else: {ota:?}"
    );
    assert!(ota.confirmed >= 25, "most traps confirmed: {ota:?}");
    assert!(ota.rolled_back_self_test > 0, "some self-tests failed: {ota:?}");
    assert!(ota.downloads_resumed > 0, "reboots interrupted downloads: {ota:?}");
    assert!(ota.bytes_downloaded >= 50 * 64 * 1_024, "{ota:?}");
    assert!(report.ok);

    // The registry shows what each trap runs now.
    let api = ApiClient::new(harness.ports.http(), harness.token.clone());
    let rollout = api
        .rollout(ota.rollout_id.expect("created"))
        .await
        .expect("rollout");
    assert_eq!(rollout.devices.len(), 50);
    for (device, state) in &rollout.devices {
        let entry = api.device(device).await.expect("device");
        let firmware = &entry["info"]["firmware"];
        let wanted = match state.as_str() {
            "confirmed" => serde_json::json!({ "major": 1, "minor": 1, "patch": 0 }),
            "rolled_back" => serde_json::json!({ "major": 1, "minor": 0, "patch": 0 }),
            other => panic!("{device} ended {other}"),
        };
        assert_eq!(*firmware, wanted, "{device} ({state}): {entry}");
    }
    eprintln!("simulator OTA test took {:.1?}", started.elapsed());
}

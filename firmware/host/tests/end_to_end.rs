//! End to end: the host firmware in a network namespace, on a TAP device,
//! against the real fleet server (`wildcam-fleet serve`) on the namespace's
//! side of the TAP. It gets its address over DHCP (dnsmasq on the TAP), claims
//! itself with a claim token, sends detections and
//! health, is acked, keeps its queue across a server restart and its own
//! power loss (no detection lost or duplicated), and applies a configuration
//! sent through the API. A second test rolls signed firmware out to it
//! through the server's OTA API: downloaded into the inactive slot, verified,
//! rebooted into and confirmed; then an image whose self-test fails, rolled
//! back with the reason reported.
//!
//! Needs root (network namespaces, TAP), `ip` (iproute2), `dnsmasq` (Debian
//! dnsmasq-base) and the server binary in `WILDCAM_FLEET_BIN` (`cargo xtask ci` builds it and sets it).
//! Without them the test is skipped with a message, except under `CI=true`,
//! where it fails. All traffic stays inside the namespace it creates.
//!
//! Run: `WILDCAM_FLEET_BIN=$PWD/../target/debug/wildcam-fleet cargo test -p wildcam-firmware-host --test end_to_end`
//! (as root, from `firmware/`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use serde_json::Value;
use sha2::{Digest, Sha256};
use wildcam_sdk::ota::{MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature, SignedManifest};
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

const TAP: &str = "wctap0";
const SERVER_ADDRESS: &str = "192.168.77.1";
/// The addresses dnsmasq leases to the trap.
const DHCP_RANGE: &str = "192.168.77.50,192.168.77.99,255.255.255.0,10m";
/// Longest wait for any one expected event.
const WAIT: Duration = Duration::from_secs(30);

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite(fleet: Option<&Path>) -> Option<String> {
    if run_ok(Command::new("id").arg("-u")).is_none_or(|uid| uid.trim() != "0") {
        return Some("not running as root (network namespaces and TAP devices need it)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    if run_ok(Command::new("ip").arg("-V")).is_none() {
        return Some("`ip` (Debian package iproute2) is not installed".into());
    }
    if run_ok(Command::new("dnsmasq").arg("--version")).is_none() {
        return Some("`dnsmasq` (Debian package dnsmasq-base) is not installed".into());
    }
    match fleet {
        None => Some("WILDCAM_FLEET_BIN is not set to the wildcam-fleet binary".into()),
        Some(path) if !path.exists() => Some(format!("WILDCAM_FLEET_BIN={} does not exist", path.display())),
        Some(_) => None,
    }
}

fn run_ok(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `command`, failing the test with its output if it fails.
fn must(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ip netns exec <namespace> <program>`.
fn netns_command(namespace: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(program);
    command
}

/// A network namespace with a TAP device, deleted on drop (which also
/// removes the TAP and ends nothing else: the test kills its processes first).
struct Namespace {
    name: String,
}

impl Namespace {
    fn create(test: &str) -> Self {
        let name = format!("wcfw-{test}-{}", std::process::id());
        must(Command::new("ip").args(["netns", "add", &name]));
        let namespace = Self { name };
        namespace.exec_must(&["ip", "link", "set", "lo", "up"]);
        namespace.exec_must(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"]);
        namespace.exec_must(&["ip", "addr", "add", &format!("{SERVER_ADDRESS}/24"), "dev", TAP]);
        namespace.exec_must(&["ip", "link", "set", TAP, "up"]);
        namespace
    }

    /// `ip netns exec <name> <program>`.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.name, program)
    }

    fn exec_must(&self, words: &[&str]) -> String {
        must(self.command(words[0]).args(&words[1..]))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed on drop, its output lines forwarded to a channel
/// (and echoed, prefixed, so a failing test shows what happened).
struct Process {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Process {
    fn spawn(mut command: Command, label: &'static str) -> Self {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {label}: {error}"));
        let (sender, lines) = mpsc::channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{label}] {line}");
                    if sender.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits for a line containing `needle`; returns it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line containing {needle:?} within {} s", WAIT.as_secs()),
            }
        }
    }

    fn stdin(&mut self) -> &mut ChildStdin {
        self.child.stdin.as_mut().expect("stdin is piped")
    }

    /// SIGTERM, then wait (a clean shutdown acknowledges what it committed).
    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process {pid} did not stop on SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dnsmasq serving DHCP (only) on the namespace's side of the TAP.
fn dhcp_server(namespace: &Namespace, work: &Path) -> Process {
    let mut command = namespace.command("dnsmasq");
    command
        .args(["--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
        .args(["--port=0", "--bind-interfaces", "--user=root", "--log-dhcp", "--log-facility=-"])
        .arg(format!("--interface={TAP}"))
        .arg(format!("--dhcp-range={DHCP_RANGE}"))
        .arg(format!("--dhcp-option=option:router,{SERVER_ADDRESS}"))
        .arg(format!("--dhcp-leasefile={}", work.join("leases").display()))
        .arg(format!("--pid-file={}", work.join("dnsmasq.pid").display()));
    let mut dnsmasq = Process::spawn(command, "dhcp");
    dnsmasq.expect("DHCP, IP range");
    dnsmasq
}

/// The fleet server and its operator CLI, all inside the namespace.
struct Fleet {
    namespace: String,
    binary: PathBuf,
    data_dir: PathBuf,
    api_token: String,
    /// The firmware signing public key the server accepts uploads under (hex).
    ota_signing_key: String,
}

impl Fleet {
    fn serve(&self) -> Process {
        let mut command = netns_command(&self.namespace, &self.binary);
        command
            .arg("serve")
            .env("WILDCAM__DATA_DIR", &self.data_dir)
            .env("WILDCAM__MQTT__LISTEN_V4", format!("{SERVER_ADDRESS}:18830"))
            .env("WILDCAM__MQTT__LISTEN_V5", format!("{SERVER_ADDRESS}:18831"))
            .env("WILDCAM__HTTP__LISTEN", "127.0.0.1:18080")
            .env("WILDCAM__OTA__SIGNING_KEYS", &self.ota_signing_key)
            .env("WILDCAM__LOG__FILTER", "warn,wildcam_fleet_server=info");
        let mut server = Process::spawn(command, "server");
        server.expect("fleet server started");
        server
    }

    /// An operator command, its `--json` output parsed.
    fn api(&self, arguments: &[&str]) -> Value {
        let mut command = netns_command(&self.namespace, &self.binary);
        command
            .args(arguments)
            .args(["--json", "--server", "http://127.0.0.1:18080"])
            .env("WILDCAM_TOKEN", &self.api_token);
        let output = must(&mut command);
        serde_json::from_str(&output)
            .unwrap_or_else(|error| panic!("{arguments:?}: not JSON ({error}): {output}"))
    }

    /// The sequence numbers stored for `device`, in order.
    fn stored_sequences(&self, device: &str) -> Vec<u64> {
        let listing = self.api(&["detections", "list", "--device", device, "--limit", "1000"]);
        let mut sequences: Vec<u64> = listing["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| item["seq"].as_u64().expect("seq"))
            .collect();
        sequences.sort_unstable();
        sequences
    }

    /// Polls until `device` has exactly `1..=count` stored.
    fn wait_sequences(&self, device: &str, count: u64) {
        let deadline = Instant::now() + WAIT;
        let expected: Vec<u64> = (1..=count).collect();
        loop {
            let stored = self.stored_sequences(device);
            if stored == expected {
                return;
            }
            assert!(Instant::now() < deadline, "server stored {stored:?}, expected 1..={count}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Tells the trap's PIR to fire `times` times, waiting for each burst.
fn motion(trap: &mut Process, times: usize, burst_len: usize) -> u64 {
    let mut last = 0;
    for _ in 0..times {
        writeln!(trap.stdin(), "pir").expect("trap stdin");
        trap.stdin().flush().expect("trap stdin");
        for _ in 0..burst_len {
            let line = trap.expect("queued detection seq=");
            last = line
                .split("seq=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|seq| seq.parse().ok())
                .expect("a sequence number");
        }
    }
    last
}

/// A namespace with DHCP and a fleet server, and a claim token for a trap.
/// Fields drop in order: processes before the namespace.
struct World {
    fleet: Fleet,
    claim_token: String,
    work: PathBuf,
    _dhcp: Process,
    namespace: Namespace,
}

impl World {
    /// Sets everything up (the server is returned running), or `None` when
    /// the test cannot run here (a failure under CI).
    fn new(test: &str) -> Option<(Self, Process)> {
        let fleet_binary = std::env::var_os("WILDCAM_FLEET_BIN").map(PathBuf::from);
        if let Some(reason) = missing_prerequisite(fleet_binary.as_deref()) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "end-to-end test cannot run under CI: {reason}"
            );
            eprintln!("skipping the end-to-end firmware test: {reason}");
            return None;
        }
        let work = std::env::temp_dir().join(format!("wildcam-fw-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work directory");
        let namespace = Namespace::create(test);
        let binary = fleet_binary.expect("checked above");
        let data_dir = work.join("data");
        let token_output = must(
            Command::new(&binary)
                .args(["token", "create", "--role", "admin", "--data-dir"])
                .arg(&data_dir),
        );
        let api_token = token_output
            .lines()
            .find(|line| line.starts_with("wcat_"))
            .expect("an API token")
            .to_owned();
        let ota_signing_key = hex(firmware_signing_key().verifying_key().as_bytes());
        let fleet = Fleet { namespace: namespace.name.clone(), binary, data_dir, api_token, ota_signing_key };
        let server = fleet.serve();
        let claim = fleet.api(&["claim-tokens", "create", "--uses", "1"]);
        let claim_token = claim["token"].as_str().expect("claim token").to_owned();
        let dhcp = dhcp_server(&namespace, &work);
        Some((Self { fleet, claim_token, work, _dhcp: dhcp, namespace }, server))
    }

    /// Starts the trap (DHCP, its flash in the work directory) with `extra` flags.
    fn start_trap(&self, extra: &[&str]) -> Process {
        let mut command = self
            .namespace
            .command(env!("CARGO_BIN_EXE_wildcam-trap-host"));
        command
            .args(["--tap", TAP, "--dhcp"])
            .args(["--server", SERVER_ADDRESS, "--image-len", "8192", "--flash"])
            .arg(self.work.join("trap.flash"))
            .args(extra)
            .env("WILDCAM_CLAIM_TOKEN", &self.claim_token);
        Process::spawn(command, "trap")
    }

    /// Writes a configuration file with `burst_len` and sets it for `device`;
    /// returns the desired version.
    fn set_config(&self, device: &str, burst_len: u8) -> u64 {
        let config = self.work.join("config.json");
        let text = format!(
            r#"{{"pir_sensitivity_pct": 75, "burst_len": {burst_len}, "capture_windows": [],
                "timelapse_interval_s": 0, "checkin_interval_s": 600, "upload_policy": "MetadataOnly"}}"#
        );
        std::fs::write(&config, text).expect("config file");
        let update = self
            .fleet
            .api(&["config", "set", device, config.to_str().expect("UTF-8 path")]);
        update["desired"]["version"]
            .as_u64()
            .expect("desired version")
    }

    /// Polls until the trap reports `version` applied with `burst_len`.
    fn wait_reported(&self, device: &str, version: u64, burst_len: u8) {
        let deadline = Instant::now() + WAIT;
        loop {
            let state = self.fleet.api(&["config", "get", device]);
            if state["reported"]["version"].as_u64() == Some(version) {
                assert_eq!(state["reported"]["status"], "Applied");
                assert_eq!(state["reported"]["config"]["burst_len"], burst_len);
                return;
            }
            assert!(Instant::now() < deadline, "configuration not reported: {state}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The device id from the trap's claim line.
fn claimed_device(trap: &mut Process) -> String {
    trap.expect("network up: address 192.168.77.");
    let claimed = trap.expect("claimed as device id ");
    claimed.rsplit(' ').next().expect("a device id").to_owned()
}

#[test]
fn host_firmware_claims_reports_survives_a_server_restart_and_applies_configuration() {
    let Some((world, server)) = World::new("e2e") else {
        return;
    };
    let fleet = &world.fleet;
    let mut trap = world.start_trap(&[]);
    let device = claimed_device(&mut trap);
    trap.expect("connected to the fleet server");

    // Detections and health, acknowledged.
    let last = motion(&mut trap, 2, 3);
    assert_eq!(last, 6);
    trap.expect("0 still queued");
    fleet.wait_sequences(&device, 6);
    let health = fleet.api(&["health", &device]);
    assert!(!health["items"].as_array().expect("health items").is_empty(), "a health report: {health}");

    // The server goes away; detections wait in the trap's flash queue.
    server.terminate();
    trap.expect("connection to the fleet server failed");
    let last = motion(&mut trap, 2, 3);
    assert_eq!(last, 12);
    // The trap loses power too (SIGKILL): its queue is in flash.
    drop(trap);
    let mut trap = world.start_trap(&[]);
    trap.expect(&format!("device id {device}"));
    let server = fleet.serve();
    trap.expect("connected to the fleet server");
    trap.expect("0 still queued");
    fleet.wait_sequences(&device, 12);

    // A configuration through the API: applied, reported, and in effect.
    let version = world.set_config(&device, 2);
    trap.expect(&format!("applied configuration version {version}"));
    world.wait_reported(&device, version, 2);
    let last = motion(&mut trap, 1, 2);
    assert_eq!(last, 14, "bursts of two under the new configuration");
    fleet.wait_sequences(&device, 14);

    drop(trap);
    server.terminate();
}

#[test]
fn a_checking_in_trap_sleeps_and_catches_up_on_configuration_when_it_wakes() {
    let Some((world, server)) = World::new("checkin") else {
        return;
    };
    // Linger 1 s after each check-in, upload as soon as a detection waits.
    let mut trap = world.start_trap(&["--check-in", "1,0"]);
    let device = claimed_device(&mut trap);
    trap.expect("connected to the fleet server");
    trap.expect("check-in done: disconnecting");
    trap.expect("sleeping up to");

    // Set while the trap sleeps: it gets it from the catch-up after its hello.
    let version = world.set_config(&device, 2);
    let last = motion(&mut trap, 1, 3);
    assert_eq!(last, 3, "the burst was taken under the old configuration");
    // The trap connects, says hello, gets the configuration and sends the
    // burst (its log lines interleave with the capture's, so the server is
    // asked instead).
    world.wait_reported(&device, version, 2);
    world.fleet.wait_sequences(&device, 3);
    trap.expect("check-in done: disconnecting");
    let last = motion(&mut trap, 1, 2);
    assert_eq!(last, 5);
    world.fleet.wait_sequences(&device, 5);
    drop(trap);
    server.terminate();
}

/// The firmware signing key of the OTA test (a fixed test key: the server
/// and the trap are told its public half).
fn firmware_signing_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5a; 32])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a host image of `len` bytes for `version` and its signed manifest
/// (what `cargo xtask sign` writes); returns their paths.
fn signed_image(work: &Path, version: FirmwareVersion, len: usize) -> (PathBuf, PathBuf) {
    let image: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ version.minor.to_be_bytes()[1])
        .collect();
    let manifest = Manifest {
        version,
        secure_version: 1,
        chip: Chip::Host,
        image_size: u32::try_from(len).expect("small image"),
        image_sha256: Sha256::digest(&image).into(),
        min_battery_mv: 0,
    };
    let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let message = manifest.signing_bytes(&mut buf).expect("signing bytes");
    let signature = ManifestSignature(firmware_signing_key().sign(message).to_bytes());
    let signed = SignedManifest { manifest, signature };
    let mut encoded = [0u8; 512];
    let encoded = postcard::to_slice(&signed, &mut encoded).expect("manifest encodes");
    let name = format!("host-{}.{}.{}", version.major, version.minor, version.patch);
    let image_path = work.join(format!("{name}.bin"));
    let manifest_path = work.join(format!("{name}.manifest"));
    std::fs::write(&image_path, &image).expect("image file");
    std::fs::write(&manifest_path, encoded).expect("manifest file");
    (image_path, manifest_path)
}

impl World {
    /// Uploads a signed image for `version` and rolls it out to `device`;
    /// returns the rollout id.
    fn roll_out(&self, device: &str, version: FirmwareVersion) -> u64 {
        let (image, manifest) = signed_image(&self.work, version, 48 * 1024 + 123);
        let uploaded = self.fleet.api(&[
            "firmware",
            "upload",
            "--image",
            image.to_str().expect("UTF-8 path"),
            "--manifest",
            manifest.to_str().expect("UTF-8 path"),
        ]);
        let firmware = uploaded["firmware"]["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("a firmware id: {uploaded}"));
        let rollout =
            self.fleet
                .api(&["rollout", "create", "--firmware", &firmware.to_string(), "--device", device]);
        rollout["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("a rollout id: {rollout}"))
    }

    /// Polls until `device`'s target in `rollout` is final; returns it.
    fn wait_target_final(&self, rollout: u64, device: &str) -> Value {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let shown = self.fleet.api(&["rollout", "show", &rollout.to_string()]);
            let target = shown["devices"]
                .as_array()
                .and_then(|devices| devices.iter().find(|d| d["device_id"] == device))
                .cloned()
                .unwrap_or_else(|| panic!("{device} is a target: {shown}"));
            if ["confirmed", "failed", "rolled_back", "superseded", "aborted"]
                .contains(&target["state"].as_str().unwrap_or_default())
            {
                return target;
            }
            assert!(Instant::now() < deadline, "rollout {rollout} not final for {device}: {shown}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The firmware version the registry holds for `device`.
    fn registry_version(&self, device: &str) -> Value {
        let shown = self.fleet.api(&["devices", "get", device]);
        shown["info"]["firmware"].clone()
    }
}

#[test]
fn signed_firmware_is_downloaded_verified_confirmed_and_a_failing_image_rolled_back() {
    let Some((world, server)) = World::new("ota") else {
        return;
    };
    let public_key = world.fleet.ota_signing_key.clone();
    let mut trap = world.start_trap(&["--ota-public-key", &public_key, "--self-test-fail-version", "0.3.0"]);
    let device = claimed_device(&mut trap);
    trap.expect("connected to the fleet server");

    // 0.2.0: downloaded into slot 1 while detections still flow, verified,
    // activated, rebooted into (same process, re-executed), confirmed.
    let rollout = world.roll_out(&device, FirmwareVersion { major: 0, minor: 2, patch: 0 });
    let last = motion(&mut trap, 1, 3);
    trap.expect("OTA image verified: rebooting into it");
    trap.expect("slot 1 activated with firmware 0.2.0");
    trap.expect("running slot 1 as firmware 0.2.0 (pending-verify)");
    trap.expect("self-test passed");
    let target = world.wait_target_final(rollout, &device);
    assert_eq!(target["state"], "confirmed", "{target}");
    world.fleet.wait_sequences(&device, last);
    let version = world.registry_version(&device);
    assert_eq!((version["major"].as_u64(), version["minor"].as_u64()), (Some(0), Some(2)), "{version}");

    // 0.3.0 fails its self-test on this trap: rolled back to 0.2.0, and the
    // reason reported after the reboot.
    let rollout = world.roll_out(&device, FirmwareVersion { major: 0, minor: 3, patch: 0 });
    trap.expect("running slot 0 as firmware 0.3.0 (pending-verify)");
    trap.expect("running slot 1 as firmware 0.2.0");
    let target = world.wait_target_final(rollout, &device);
    assert_eq!(target["state"], "rolled_back", "{target}");
    assert_eq!(target["outcome"], "SelfTestFailed", "{target}");
    let version = world.registry_version(&device);
    assert_eq!(version["minor"].as_u64(), Some(2), "still 0.2.0: {version}");
    drop(trap);
    server.terminate();
}

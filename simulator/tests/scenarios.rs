//! Every scenario file in `scenarios/` parses and validates, and the CLI's
//! checker names the bad key of a broken one.

use std::path::Path;

use wildcam_simulator::Scenario;

#[test]
fn every_shipped_scenario_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("scenarios directory") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(scenario.expected_detections() > 0.0, "{}", path.display());
            names.push(scenario.name);
        }
    }
    names.sort();
    for wanted in [
        "broker-outage",
        "ci-restart",
        "dawn-dusk-burst",
        "million-day",
        "ota-rehearsal",
        "steady-day",
        "traps-offline",
    ] {
        assert!(names.iter().any(|n| n == wanted), "scenario {wanted} is missing: {names:?}");
    }
}

#[test]
fn the_million_day_and_ci_scenarios_are_sized_as_documented() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let day = Scenario::load(&dir.join("million-day.toml")).expect("valid");
    assert!((day.expected_detections() - 1_000_000.0).abs() < 10_000.0);
    let ci = Scenario::load(&dir.join("ci-restart.toml")).expect("valid");
    assert!((ci.expected_detections() - 20_000.0).abs() < 1_000.0);
    let fleet = Scenario::load(&dir.join("fleet-10k.toml")).expect("valid");
    assert_eq!(fleet.fleet.traps, 10_000);
    // Its key is not in the repository: it is looked for beside the file at run time.
    let ota = Scenario::load(&dir.join("ota-rehearsal.toml")).expect("valid");
    assert!(ota.ota.enabled);
    assert_eq!((ota.fleet.traps, ota.ota.image_kib, ota.ota.max_in_flight), (200, 256, 50));
    assert_eq!(ota.ota_signing_key_path(), dir.join("ota-rehearsal.key"));
}

#[test]
fn a_bad_file_names_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "name = \"bad\"\n[fleet]\ntraps = 0\n").expect("written");
    let error = Scenario::load(&path).expect_err("refused").to_string();
    assert!(error.contains("`fleet.traps`") && error.contains("bad.toml"), "{error}");
    std::fs::write(&path, "name = \"bad\"\n[faults]\nreboots = 1\n").expect("written");
    let error = Scenario::load(&path).expect_err("refused").to_string();
    assert!(error.contains("reboots"), "{error}");
}

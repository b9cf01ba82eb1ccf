//! `wildcam-fleet`: the fleet server and its operator tools.
//!
//! `wildcam-fleet serve [--config FILE]` starts the server with its embedded
//! broker and storage; with no file every setting has a default. The
//! operator commands (`devices`, `claim-tokens`, `detections`, `health`,
//! `config`, `commands`) call its HTTP API; `token create` makes an API
//! token directly in the data directory; `demo-trap` claims a throwaway trap
//! and sends detections. See `fleet-server/README.md`; everything lives in
//! `wildcam_fleet_server::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    wildcam_fleet_server::cli::main()
}

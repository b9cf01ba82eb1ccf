//! `cargo xtask keygen --out PATH [--force]`: a new ed25519 firmware-signing key.
//!
//! Writes the private key to `PATH` (PKCS#8 PEM, created with mode 0600) and the
//! public key to `PATH.pub` (SubjectPublicKeyInfo PEM); see [`crate::key`]. The
//! seed comes from the operating system's random number generator. Neither file is
//! overwritten unless `--force` is given; even then the new private key is written
//! to a fresh 0600 file that is renamed over the old one, so it is never readable
//! by others, not even for a moment. Both files are read back through the loader
//! `sign` uses before keygen reports success.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey, KeypairBytes};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::key;

/// Mode of the private key file: read and write for the owner only.
const PRIVATE_KEY_MODE: u32 = 0o600;
/// Mode of the public key file.
const PUBLIC_KEY_MODE: u32 = 0o644;

/// Flags of `cargo xtask keygen`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Private key file to create (the public key goes to PATH.pub). Ending it in
    /// `.key` keeps it out of git (see .gitignore).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Replace existing key files (the old private key is lost).
    #[arg(long)]
    pub force: bool,
}

/// Generates a key pair and writes it as `args` says.
pub fn run(args: &Args) -> Result<()> {
    let signing_key = generate()?;
    write_key_pair(&signing_key, &args.out, args.force)?;
    let verifying_key = signing_key.verifying_key();
    println!("private key: {} (mode 600, keep it secret)", args.out.display());
    println!("public key:  {}", key::public_key_path(&args.out).display());
    println!("public key (hex, for firmware): {}", key::public_key_hex(&verifying_key));
    println!("fingerprint: {}", key::fingerprint(&verifying_key));
    Ok(())
}

/// A new key from 32 bytes of operating-system randomness.
fn generate() -> Result<SigningKey> {
    let mut seed = Zeroizing::new([0u8; 32]);
    OsRng
        .try_fill_bytes(seed.as_mut())
        .map_err(|error| anyhow!("operating-system randomness failed: {error}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `signing_key` to `path` and its public key to `path.pub`, then reads
/// both back to check they load and match.
fn write_key_pair(signing_key: &SigningKey, path: &Path, force: bool) -> Result<()> {
    let public_path = key::public_key_path(path);
    if !force {
        refuse_existing(path)?;
        refuse_existing(&public_path)?;
    }
    // Seed only (PKCS#8 v1): OpenSSL 3.0 refuses the v2 form that also embeds the
    // public key, and the loader derives the public key from the seed anyway.
    let seed_only = KeypairBytes { secret_key: signing_key.to_bytes(), public_key: None };
    let private_pem = seed_only
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|error| anyhow!("could not encode the private key: {error}"))?;
    let public_pem = signing_key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|error| anyhow!("could not encode the public key: {error}"))?;
    write_file(path, private_pem.as_bytes(), PRIVATE_KEY_MODE, force)?;
    write_file(&public_path, public_pem.as_bytes(), PUBLIC_KEY_MODE, force)?;
    check_written(signing_key, path, &public_path)
}

fn refuse_existing(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        bail!("{} already exists; pass --force to replace it", path.display());
    }
    Ok(())
}

/// Writes `contents` to `path` with exactly `mode`. Without `replace`, `path`
/// must not exist; with it, the file is written beside `path` and renamed over it.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> Result<()> {
    if !replace {
        return create_new(path, contents, mode);
    }
    let staging = staging_path(path)?;
    create_new(&staging, contents, mode)?;
    if let Err(error) = fs::rename(&staging, path) {
        let _ = fs::remove_file(&staging);
        return Err(error).with_context(|| format!("could not replace {}", path.display()));
    }
    Ok(())
}

/// Creates `path` (which must not exist) with `mode` and writes `contents`.
fn create_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| match error.kind() {
            io::ErrorKind::AlreadyExists => {
                anyhow!("{} already exists; pass --force to replace it", path.display())
            }
            _ => anyhow!(error).context(format!("could not create {}", path.display())),
        })?;
    fill(file, contents, mode).with_context(|| format!("could not write {}", path.display()))
}

/// Sets `mode` exactly (the umask may have cleared bits) and writes `contents`.
fn fill(mut file: File, contents: &[u8], mode: u32) -> io::Result<()> {
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

/// A temporary name in the same directory as `path`, so a rename replaces it
/// atomically.
fn staging_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} does not name a file", path.display()))?;
    let mut staging = std::ffi::OsString::from(".");
    staging.push(name);
    staging.push(format!(".new-{}", std::process::id()));
    Ok(path.with_file_name(staging))
}

/// Reads both files back through [`key`]'s loaders and checks they hold the key.
fn check_written(signing_key: &SigningKey, path: &Path, public_path: &Path) -> Result<()> {
    let loaded = key::load_signing_key(path)?;
    let loaded_public = key::load_verifying_key(public_path)?;
    if loaded.to_bytes() != signing_key.to_bytes() || loaded_public != signing_key.verifying_key() {
        bail!("the key read back from {} does not match the key generated", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn keygen(path: &Path, force: bool) -> Result<()> {
        run(&Args { out: path.to_path_buf(), force })
    }

    #[test]
    fn writes_a_private_key_only_the_owner_can_read() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("firmware.key");
        keygen(&path, false).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&key::public_key_path(&path)), 0o644);
        let pem = fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let signing_key = key::load_signing_key(&path).unwrap();
        let public_key = key::load_verifying_key(&key::public_key_path(&path)).unwrap();
        assert_eq!(signing_key.verifying_key(), public_key);
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("firmware.key");
        keygen(&path, false).unwrap();
        let before = fs::read(&path).unwrap();
        let error = keygen(&path, false).unwrap_err().to_string();
        assert!(error.contains("already exists") && error.contains("--force"), "{error}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn refuses_when_only_the_public_key_exists() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("firmware.key");
        fs::write(key::public_key_path(&path), "old").unwrap();
        assert!(
            keygen(&path, false)
                .unwrap_err()
                .to_string()
                .contains("firmware.key.pub already exists")
        );
        assert!(!path.exists(), "no private key may be left behind");
    }

    #[test]
    fn force_replaces_both_files_and_still_writes_0600() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("firmware.key");
        fs::write(&path, "an old key, world-readable").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        fs::write(key::public_key_path(&path), "old").unwrap();
        keygen(&path, true).unwrap();
        assert_eq!(mode(&path), 0o600);
        let first = key::load_signing_key(&path).unwrap();
        keygen(&path, true).unwrap();
        assert_ne!(key::load_signing_key(&path).unwrap().to_bytes(), first.to_bytes());
        let leftovers = fs::read_dir(directory.path()).unwrap().count();
        assert_eq!(leftovers, 2, "no staging files are left behind");
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("no/such/dir/firmware.key");
        let error = format!("{:#}", keygen(&path, false).unwrap_err());
        assert!(error.contains("could not create") && error.contains("firmware.key"), "{error}");
    }
}

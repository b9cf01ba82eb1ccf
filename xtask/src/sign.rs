//! `cargo xtask sign`: a signed OTA manifest for a firmware image.
//!
//! ```text
//! cargo xtask sign --key fleet-signing.key --image app.bin --chip esp32c3 \
//!     --version 1.2.0 --secure-version 1 [--min-battery-mv 3300] [--out app.manifest] [--force]
//! ```
//!
//! The manifest (version, secure version, chip, image size, SHA-256 of the
//! image, minimum battery) is signed with the firmware signing key over
//! exactly the bytes the device verifies (`Manifest::signing_bytes` in the
//! sdk), then written as the postcard encoding of `SignedManifest`: the same
//! bytes the fleet server embeds in an `OtaOffer`. The signature is checked
//! with the sdk's own verifier before the file is written. `--out` defaults
//! to the image path with `.manifest` appended; an existing file is replaced
//! only with `--force`.
//!
//! `cargo xtask verify-manifest --public-key KEY.pub --manifest M [--image I]`
//! checks a manifest (and optionally the image it describes) the way a trap
//! does.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::Signer;
use postcard::experimental::max_size::MaxSize;
use sha2::{Digest, Sha256};
use wildcam_sdk::ota::{MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature, SignedManifest};
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

use crate::{key, keygen};

/// Mode of the manifest file: it is public.
const MANIFEST_MODE: u32 = 0o644;
/// Default minimum battery for an update, millivolts (a Li-ion cell at ~20 %).
pub const MIN_BATTERY_MV_DEFAULT: u16 = 3_500;

/// Flags of `cargo xtask sign`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Private signing key written by `cargo xtask keygen`.
    #[arg(long, value_name = "PATH")]
    pub key: PathBuf,
    /// The firmware image exactly as it will be written to the OTA slot.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Chip the image is built for: esp32c3, esp32c6 or host.
    #[arg(long, value_parser = parse_chip)]
    pub chip: Chip,
    /// Firmware version, MAJOR.MINOR.PATCH.
    #[arg(long, value_parser = parse_version)]
    pub version: FirmwareVersion,
    /// Anti-rollback counter: traps refuse images below their own.
    #[arg(long)]
    pub secure_version: u32,
    /// Traps refuse the update below this battery voltage (millivolts).
    #[arg(long, default_value_t = MIN_BATTERY_MV_DEFAULT)]
    pub min_battery_mv: u16,
    /// Where to write the signed manifest (default: IMAGE.manifest).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Replace an existing manifest file.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `cargo xtask verify-manifest`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Public key file (`KEY.pub` from `cargo xtask keygen`).
    #[arg(long, value_name = "PATH")]
    pub public_key: PathBuf,
    /// Signed manifest written by `cargo xtask sign`.
    #[arg(long, value_name = "PATH")]
    pub manifest: PathBuf,
    /// Also check this image's size and SHA-256 against the manifest.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
}

/// Signs the image as `args` says and writes the manifest.
pub fn run(args: &Args) -> Result<()> {
    let signing_key = key::load_signing_key(&args.key)?;
    let image =
        fs::read(&args.image).with_context(|| format!("could not read image {}", args.image.display()))?;
    let manifest = manifest_for(&image, args)?;
    let signed = sign(&signing_key, manifest)?;
    let public_key = signing_key.verifying_key();
    signed.verify(public_key.as_bytes()).map_err(|error| {
        anyhow!("the new signature does not verify with the sdk ({error}); nothing written")
    })?;
    let out = args.out.clone().unwrap_or_else(|| default_out(&args.image));
    let bytes = encode(&signed)?;
    keygen::write_file(&out, &bytes, MANIFEST_MODE, args.force)?;
    print_summary(&signed.manifest, &out, &key::fingerprint(&public_key));
    Ok(())
}

/// Checks a manifest file, and optionally its image, as a trap would.
pub fn run_verify(args: &VerifyArgs) -> Result<()> {
    let public_key = key::load_verifying_key(&args.public_key)?;
    let bytes =
        fs::read(&args.manifest).with_context(|| format!("could not read {}", args.manifest.display()))?;
    let signed: SignedManifest = postcard::from_bytes(&bytes)
        .map_err(|error| anyhow!("{} is not a signed manifest: {error}", args.manifest.display()))?;
    let manifest = signed
        .verify(public_key.as_bytes())
        .map_err(|error| anyhow!("{}: {error}", args.manifest.display()))?;
    if let Some(path) = &args.image {
        let image = fs::read(path).with_context(|| format!("could not read image {}", path.display()))?;
        check_image(manifest, &image)
            .with_context(|| format!("{} does not match the manifest", path.display()))?;
    }
    print_summary(manifest, &args.manifest, &key::fingerprint(&public_key));
    println!("signature: valid");
    Ok(())
}

fn manifest_for(image: &[u8], args: &Args) -> Result<Manifest> {
    if image.is_empty() {
        bail!("image {} is empty", args.image.display());
    }
    let image_size = u32::try_from(image.len())
        .map_err(|_| anyhow!("image {} is larger than 4 GiB", args.image.display()))?;
    Ok(Manifest {
        version: args.version,
        secure_version: args.secure_version,
        chip: args.chip,
        image_size,
        image_sha256: Sha256::digest(image).into(),
        min_battery_mv: args.min_battery_mv,
    })
}

fn sign(signing_key: &ed25519_dalek::SigningKey, manifest: Manifest) -> Result<SignedManifest> {
    let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let bytes = manifest
        .signing_bytes(&mut buf)
        .map_err(|error| anyhow!("encoding the manifest: {error}"))?;
    let signature = ManifestSignature(signing_key.sign(bytes).to_bytes());
    Ok(SignedManifest { manifest, signature })
}

fn encode(signed: &SignedManifest) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; SignedManifest::POSTCARD_MAX_SIZE];
    let len = postcard::to_slice(signed, &mut buf)
        .map_err(|error| anyhow!("encoding the manifest: {error}"))?
        .len();
    buf.truncate(len);
    Ok(buf)
}

fn check_image(manifest: &Manifest, image: &[u8]) -> Result<()> {
    if u32::try_from(image.len()).ok() != Some(manifest.image_size) {
        bail!("image is {} bytes, the manifest says {}", image.len(), manifest.image_size);
    }
    let digest: [u8; 32] = Sha256::digest(image).into();
    if digest != manifest.image_sha256 {
        bail!("image SHA-256 is {}, the manifest says {}", hex(&digest), hex(&manifest.image_sha256));
    }
    Ok(())
}

fn default_out(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".manifest");
    PathBuf::from(name)
}

fn print_summary(manifest: &Manifest, path: &Path, fingerprint: &str) {
    let v = manifest.version;
    println!("manifest:       {}", path.display());
    println!(
        "version:        {}.{}.{} (secure version {})",
        v.major, v.minor, v.patch, manifest.secure_version
    );
    println!("chip:           {}", chip_name(manifest.chip));
    println!("image:          {} bytes, SHA-256 {}", manifest.image_size, hex(&manifest.image_sha256));
    println!("min battery:    {} mV", manifest.min_battery_mv);
    println!("signed by:      {fingerprint}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn chip_name(chip: Chip) -> &'static str {
    match chip {
        Chip::Esp32c3 => "esp32c3",
        Chip::Esp32c6 => "esp32c6",
        Chip::Host => "host",
        _ => "unknown",
    }
}

/// Parses `esp32c3`, `esp32c6` or `host`.
pub fn parse_chip(text: &str) -> Result<Chip, String> {
    match text.to_ascii_lowercase().as_str() {
        "esp32c3" | "esp32-c3" => Ok(Chip::Esp32c3),
        "esp32c6" | "esp32-c6" => Ok(Chip::Esp32c6),
        "host" => Ok(Chip::Host),
        _ => Err(format!("unknown chip {text:?}: expected esp32c3, esp32c6 or host")),
    }
}

/// Parses `MAJOR.MINOR.PATCH`, each 0..=65535.
pub fn parse_version(text: &str) -> Result<FirmwareVersion, String> {
    let parts: Vec<&str> = text.split('.').collect();
    let [major, minor, patch] = parts.as_slice() else {
        return Err(format!("version {text:?} is not MAJOR.MINOR.PATCH"));
    };
    let number = |part: &str| {
        part.parse::<u16>()
            .map_err(|_| format!("version {text:?}: {part:?} is not a number from 0 to 65535"))
    };
    Ok(FirmwareVersion { major: number(major)?, minor: number(minor)?, patch: number(patch)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen;

    fn key_pair(dir: &Path) -> PathBuf {
        let path = dir.join("signing.key");
        keygen::run(&keygen::Args { out: path.clone(), force: false }).unwrap();
        path
    }

    fn args(dir: &Path, key: PathBuf, image: &[u8]) -> Args {
        let image_path = dir.join("app.bin");
        fs::write(&image_path, image).unwrap();
        Args {
            key,
            image: image_path,
            chip: Chip::Esp32c3,
            version: FirmwareVersion { major: 1, minor: 2, patch: 0 },
            secure_version: 4,
            min_battery_mv: 3_400,
            out: None,
            force: false,
        }
    }

    #[test]
    fn signed_manifest_verifies_with_the_sdk() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_pair(dir.path());
        let image: Vec<u8> = (0..5_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let args = args(dir.path(), key.clone(), &image);
        run(&args).unwrap();
        let bytes = fs::read(dir.path().join("app.bin.manifest")).unwrap();
        let signed: SignedManifest = postcard::from_bytes(&bytes).unwrap();
        let public = key::load_verifying_key(&key::public_key_path(&key)).unwrap();
        let manifest = signed.verify(public.as_bytes()).unwrap();
        assert_eq!(manifest.image_size, 5_000);
        assert_eq!(manifest.image_sha256, <[u8; 32]>::from(Sha256::digest(&image)));
        assert_eq!(
            (manifest.chip, manifest.secure_version, manifest.min_battery_mv),
            (Chip::Esp32c3, 4, 3_400)
        );
        let verify = VerifyArgs {
            public_key: key::public_key_path(&key),
            manifest: dir.path().join("app.bin.manifest"),
            image: Some(args.image.clone()),
        };
        run_verify(&verify).unwrap();
    }

    #[test]
    fn verify_refuses_another_image_and_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_pair(dir.path());
        let args = args(dir.path(), key.clone(), b"firmware image");
        run(&args).unwrap();
        let manifest = dir.path().join("app.bin.manifest");
        fs::write(dir.path().join("other.bin"), b"firmware imagf").unwrap();
        let error = run_verify(&VerifyArgs {
            public_key: key::public_key_path(&key),
            manifest: manifest.clone(),
            image: Some(dir.path().join("other.bin")),
        })
        .unwrap_err();
        assert!(format!("{error:#}").contains("SHA-256"), "{error:#}");

        let other_key = dir.path().join("other.key");
        keygen::run(&keygen::Args { out: other_key.clone(), force: false }).unwrap();
        let error =
            run_verify(&VerifyArgs { public_key: key::public_key_path(&other_key), manifest, image: None })
                .unwrap_err();
        assert!(format!("{error:#}").contains("signature"), "{error:#}");
    }

    #[test]
    fn existing_manifest_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_pair(dir.path());
        let mut args = args(dir.path(), key, b"image one");
        run(&args).unwrap();
        let error = run(&args).unwrap_err();
        assert!(format!("{error:#}").contains("--force"), "{error:#}");
        args.force = true;
        run(&args).unwrap();
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_pair(dir.path());
        let error = run(&args(dir.path(), key.clone(), b"")).unwrap_err();
        assert!(format!("{error:#}").contains("empty"), "{error:#}");
        let mut missing = args(dir.path(), key, b"x");
        missing.image = dir.path().join("nope.bin");
        let error = run(&missing).unwrap_err();
        assert!(format!("{error:#}").contains("could not read image"), "{error:#}");
        assert!(parse_version("1.2").is_err());
        assert!(parse_version("1.2.70000").is_err());
        assert_eq!(parse_version("3.0.12"), Ok(FirmwareVersion { major: 3, minor: 0, patch: 12 }));
        assert!(parse_chip("esp32").is_err());
        assert_eq!(parse_chip("ESP32C6"), Ok(Chip::Esp32c6));
    }
}

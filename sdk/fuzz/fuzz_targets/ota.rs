//! Fuzzes the OTA path with arbitrary bytes: a persisted `OtaRecord` decoded
//! and resumed from, and a stream of fuzzer-made `OtaChunk` messages fed to a
//! machine that accepted a genuine signed offer. Nothing panics, and the
//! machine never declares an update ready unless the slot holds exactly the
//! signed image.
//! Run: `cd sdk && cargo +nightly fuzz run ota`.

#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use wildcam_sdk::ota::{
    BootAction, BootedImage, MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature, MemorySlot, OtaConfig,
    OtaMachine, OtaOffer, OtaRecord, SignedManifest,
};
use wildcam_sdk::protocol::{Chip, FirmwareVersion, OtaChunk, decode};

const IMAGE_LEN: usize = 64;
const RUNNING: FirmwareVersion = FirmwareVersion { major: 1, minor: 0, patch: 0 };

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[9; 32]);
    let config = OtaConfig::new(key.verifying_key().to_bytes(), Chip::Esp32c3, RUNNING, 1);

    if let Ok(record) = OtaRecord::decode(data) {
        let _ = OtaMachine::resume(config.clone(), Some(record), BootedImage::Updated);
    }

    let image: Vec<u8> = (0..IMAGE_LEN as u8).collect();
    let offer = genuine_offer(&key, &image);
    let mut slot = MemorySlot::new([0u8; 2 * IMAGE_LEN]);
    let mut machine = OtaMachine::new(config);
    let _ = machine.on_offer(&offer, 4_000, &mut slot);
    // The fuzzer's bytes as a stream of length-prefixed chunk messages.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (message, tail) = tail.split_at(usize::from(len).min(tail.len()));
        rest = tail;
        let Ok(chunk) = decode::<OtaChunk>(message) else {
            continue;
        };
        let Ok(actions) = machine.on_chunk(&chunk, &mut slot) else {
            continue;
        };
        if actions.verify {
            let mut buf = [0u8; 16];
            for _ in 0..IMAGE_LEN {
                let Ok(step) = machine.verify_step(&mut slot, &mut buf) else {
                    break;
                };
                if step.boot == Some(BootAction::UpdateReady) {
                    assert_eq!(&slot.contents()[..IMAGE_LEN], &image[..], "a wrong image was declared ready");
                }
                if !step.verify {
                    break;
                }
            }
        }
    }
});

fn genuine_offer(key: &SigningKey, image: &[u8]) -> OtaOffer {
    let manifest = Manifest {
        version: FirmwareVersion { major: 1, minor: 1, patch: 0 },
        secure_version: 1,
        chip: Chip::Esp32c3,
        image_size: image.len() as u32,
        image_sha256: Sha256::digest(image).into(),
        min_battery_mv: 3_300,
    };
    let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let bytes = manifest.signing_bytes(&mut buf).expect("manifest fits");
    let signature = ManifestSignature(key.sign(bytes).to_bytes());
    OtaOffer { rollout_id: 7, manifest: SignedManifest { manifest, signature }, chunk_len: 16 }
}

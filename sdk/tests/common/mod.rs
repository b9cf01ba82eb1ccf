//! Fixtures shared by the integration tests.

use wildcam_sdk::protocol::*;

/// The typical detection of `docs/benchmarks.md`: 3 classifier results, a
/// bounding box, the image size and an 8-byte digest.
pub fn typical_detection() -> Detection {
    Detection {
        seq: 48_213,
        captured_at: 1_795_000_000,
        trigger: Trigger::Pir,
        burst_index: 1,
        burst_len: 3,
        classes: [(17, 91), (4, 6), (230, 2)]
            .into_iter()
            .map(|(label, confidence_pct)| Classification { label, confidence_pct })
            .collect(),
        bbox: Some(BoundingBox { x: 3_120, y: 4_410, width: 2_250, height: 1_870 }),
        image_len: 187_342,
        image_digest: [0x9f, 0x1c, 0x42, 0x07, 0xee, 0x31, 0x5a, 0xd0],
        battery_mv: 3_912,
    }
}

//! A small deterministic random generator (SplitMix64 seeding a
//! xoshiro256**), so that a scenario and its seed give the same detections on
//! every machine and with every version of every dependency.
//!
//! Not for secrets: identities are derived with SHA-256 (`fleet.rs`).

/// One independent stream of pseudo-random numbers.
#[derive(Debug, Clone)]
pub struct Rng {
    state: [u64; 4],
}

/// The SplitMix64 step: a good 64-bit mix of a counter.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A stream for `seed` and `stream` (e.g. a trap index and a purpose):
    /// different pairs give unrelated streams.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut z = mix64(seed ^ mix64(stream.wrapping_add(0x5157_4E41_4D45)));
        let mut state = [0u64; 4];
        for word in &mut state {
            z = mix64(z);
            *word = z;
        }
        if state == [0; 4] {
            state[0] = 1;
        }
        Self { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = &mut self.state;
        let result = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = *s1 << 17;
        *s2 ^= *s0;
        *s3 ^= *s1;
        *s1 ^= *s2;
        *s0 ^= *s3;
        *s2 ^= t;
        *s3 = s3.rotate_left(45);
        result
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high)`.
    pub fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in `low..=high`.
    pub fn int(&mut self, low: u32, high: u32) -> u32 {
        let span = u64::from(high.saturating_sub(low)) + 1;
        low + (self.next_u64() % span) as u32
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponentially distributed with the given rate (mean `1 / rate`).
    pub fn exponential(&mut self, rate: f64) -> f64 {
        // 1 - unit() is in (0, 1]: the logarithm is finite.
        -(1.0 - self.unit()).ln() / rate
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Random bytes.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, 1).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(7, 1).next_u64(), Rng::new(7, 2).next_u64());
        assert_ne!(Rng::new(7, 1).next_u64(), Rng::new(8, 1).next_u64());
    }

    #[test]
    fn distributions_have_the_right_means() {
        let mut rng = Rng::new(1, 1);
        let n = 100_000;
        let unit: f64 = (0..n).map(|_| rng.unit()).sum::<f64>() / n as f64;
        let exp: f64 = (0..n).map(|_| rng.exponential(4.0)).sum::<f64>() / n as f64;
        let normal: f64 = (0..n).map(|_| rng.normal()).sum::<f64>() / n as f64;
        assert!((unit - 0.5).abs() < 0.01, "{unit}");
        assert!((exp - 0.25).abs() < 0.01, "{exp}");
        assert!(normal.abs() < 0.02, "{normal}");
        assert!((0..1000).all(|_| (3..=5).contains(&rng.int(3, 5))));
    }
}

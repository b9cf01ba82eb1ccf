//! Diel activity: when animals (and false triggers) fire a trap's PIR.
//!
//! Each species follows a daily activity curve ([`Pattern`]): most mammals
//! are nocturnal, deer and hares crepuscular with peaks at dawn and dusk,
//! squirrels, birds and people diurnal. False triggers (sun-warmed
//! vegetation, wind) follow the daytime curve. A trap's triggers are an
//! inhomogeneous Poisson process: the sum of its species' rates at each hour,
//! sampled by thinning (Lewis and Shedler): candidates at the peak rate, each
//! kept with probability `rate(t) / peak`.

use serde::Deserialize;

use crate::rng::Rng;

/// Hour of dawn (local solar time) for crepuscular peaks.
const DAWN_H: f64 = 6.0;
/// Hour of dusk.
const DUSK_H: f64 = 19.0;
/// Width (standard deviation, hours) of a crepuscular peak.
const TWILIGHT_SIGMA_H: f64 = 1.2;
/// Samples per day used to normalise the curves.
const CURVE_SAMPLES: usize = 24 * 12;

/// When a species is active.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Active at night, peaking around midnight.
    Nocturnal,
    /// Active at dawn and dusk.
    Crepuscular,
    /// Active by day, peaking at noon.
    Diurnal,
    /// Active around the clock.
    Cathemeral,
}

impl Pattern {
    /// Relative activity at `hour` (0..24), before normalisation.
    fn raw(self, hour: f64) -> f64 {
        let angle = std::f64::consts::TAU * hour / 24.0;
        match self {
            // Midnight peak, a low floor by day.
            Pattern::Nocturnal => 0.08 + (1.0 + angle.cos()).powi(2) / 4.0,
            Pattern::Diurnal => 0.05 + (1.0 - angle.cos()).powi(2) / 4.0,
            Pattern::Crepuscular => 0.05 + twilight(hour, DAWN_H) + twilight(hour, DUSK_H),
            Pattern::Cathemeral => 1.0,
        }
    }

    /// Activity at `hour` relative to the daily mean (mean 1 over a day).
    pub fn relative(self, hour: f64) -> f64 {
        self.raw(hour) / self.mean()
    }

    /// Highest relative activity over the day (with a margin: thinning needs an upper bound).
    pub fn peak(self) -> f64 {
        let mean = self.mean();
        (0..CURVE_SAMPLES)
            .map(|i| self.raw(i as f64 * 24.0 / CURVE_SAMPLES as f64) / mean)
            .fold(0.0, f64::max)
            * 1.02
    }

    fn mean(self) -> f64 {
        (0..CURVE_SAMPLES)
            .map(|i| self.raw(i as f64 * 24.0 / CURVE_SAMPLES as f64))
            .sum::<f64>()
            / CURVE_SAMPLES as f64
    }
}

/// A Gaussian bump around `center` on the 24-hour circle.
fn twilight(hour: f64, center: f64) -> f64 {
    let distance = (hour - center).rem_euclid(24.0);
    let distance = distance.min(24.0 - distance);
    (-(distance * distance) / (2.0 * TWILIGHT_SIGMA_H * TWILIGHT_SIGMA_H)).exp()
}

/// What fired a trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// An animal of the trap's species at this index (into the scenario's list).
    Animal(usize),
    /// A false trigger: the frames are blank.
    Blank,
}

/// One source of triggers at a trap.
#[derive(Debug, Clone, Copy)]
struct Source {
    cause: Cause,
    pattern: Pattern,
    /// Triggers per virtual second averaged over a day.
    rate_per_s: f64,
    /// `rate_per_s` over the pattern's daily mean: rate at an hour = scale × raw curve.
    scale: f64,
}

/// A trap's trigger process.
#[derive(Debug, Clone)]
pub struct Activity {
    sources: Vec<Source>,
    /// Upper bound of the summed rate, per second.
    peak_per_s: f64,
}

impl Activity {
    /// A process with `triggers_per_day` in total, `blank_rate` of them false,
    /// the rest split by `species` weights `(index, pattern, weight)`.
    pub fn new(triggers_per_day: f64, blank_rate: f64, species: &[(usize, Pattern, f64)]) -> Self {
        let per_s = triggers_per_day / 86_400.0;
        let total_weight: f64 = species.iter().map(|(_, _, w)| w).sum();
        let mut sources: Vec<Source> = species
            .iter()
            .map(|&(index, pattern, weight)| {
                let rate_per_s = per_s * (1.0 - blank_rate) * weight / total_weight.max(f64::MIN_POSITIVE);
                Source {
                    cause: Cause::Animal(index),
                    pattern,
                    rate_per_s,
                    scale: rate_per_s / pattern.mean(),
                }
            })
            .collect();
        let blank_per_s = per_s * blank_rate;
        let blank = Pattern::Diurnal;
        sources.push(Source {
            cause: Cause::Blank,
            pattern: blank,
            rate_per_s: blank_per_s,
            scale: blank_per_s / blank.mean(),
        });
        sources.retain(|s| s.rate_per_s > 0.0);
        let peak_per_s = sources
            .iter()
            .map(|s| s.rate_per_s * s.pattern.peak())
            .sum();
        Self { sources, peak_per_s }
    }

    /// The first trigger after `after_s` (virtual seconds since the epoch of
    /// local midnight), or `None` if the trap never triggers or none comes
    /// before `until_s`.
    pub fn next(&self, rng: &mut Rng, after_s: f64, until_s: f64) -> Option<(f64, Cause)> {
        if self.peak_per_s <= 0.0 {
            return None;
        }
        let mut t = after_s;
        loop {
            t += rng.exponential(self.peak_per_s);
            if t >= until_s {
                return None;
            }
            let hour = (t / 3_600.0).rem_euclid(24.0);
            let rate = |s: &Source| s.scale * s.pattern.raw(hour);
            let total: f64 = self.sources.iter().map(rate).sum();
            let pick = rng.unit() * self.peak_per_s;
            if pick >= total {
                continue;
            }
            let mut acc = 0.0;
            for source in &self.sources {
                acc += rate(source);
                if pick < acc {
                    return Some((t, source.cause));
                }
            }
            return self.sources.last().map(|s| (t, s.cause));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_have_mean_one_and_the_right_peaks() {
        for pattern in [Pattern::Nocturnal, Pattern::Crepuscular, Pattern::Diurnal, Pattern::Cathemeral] {
            let mean: f64 = (0..240)
                .map(|i| pattern.relative(i as f64 / 10.0))
                .sum::<f64>()
                / 240.0;
            assert!((mean - 1.0).abs() < 0.01, "{pattern:?} {mean}");
        }
        assert!(Pattern::Nocturnal.relative(0.0) > 5.0 * Pattern::Nocturnal.relative(12.0));
        assert!(Pattern::Diurnal.relative(12.0) > 5.0 * Pattern::Diurnal.relative(0.0));
        let crepuscular = Pattern::Crepuscular;
        assert!(crepuscular.relative(DAWN_H) > 5.0 * crepuscular.relative(12.0));
        assert!(crepuscular.relative(DUSK_H) > 5.0 * crepuscular.relative(0.5));
    }

    #[test]
    fn the_process_has_the_configured_rate_and_blank_share() {
        let activity = Activity::new(200.0, 0.4, &[(0, Pattern::Nocturnal, 1.0), (1, Pattern::Diurnal, 1.0)]);
        let mut rng = Rng::new(3, 3);
        let days = 50.0;
        let (mut t, mut count, mut blanks, mut night) = (0.0, 0, 0, 0);
        while let Some((at, cause)) = activity.next(&mut rng, t, days * 86_400.0) {
            t = at;
            count += 1;
            blanks += usize::from(cause == Cause::Blank);
            let hour = (at / 3_600.0) % 24.0;
            night += usize::from(cause == Cause::Animal(0) && !(6.0..18.0).contains(&hour));
        }
        let per_day = count as f64 / days;
        assert!((per_day - 200.0).abs() < 10.0, "{per_day}");
        let blank_share = blanks as f64 / count as f64;
        assert!((blank_share - 0.4).abs() < 0.03, "{blank_share}");
        assert!(night as f64 / days > 45.0, "nocturnal animals come at night");
    }
}

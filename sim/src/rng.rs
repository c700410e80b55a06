//! Deterministic randomness for the simulator.
//!
//! xoshiro256** seeded through splitmix64, plus the few transcendental
//! functions the traffic model needs (`exp`, `ln`, `cos`). Those are written
//! here with IEEE-754 basic operations only (add, multiply, divide, `sqrt`,
//! `round`), which are correctly rounded everywhere, instead of calling the
//! platform's libm, whose last bit differs between systems: a seed must give
//! byte-identical output on every platform and Rust version.

use std::f64::consts::{FRAC_PI_2, LN_2, LOG2_E, PI, SQRT_2, TAU};

/// splitmix64's output function: a bijection on `u64` (xor-shifts and odd
/// multiplications are invertible), so distinct inputs give distinct outputs.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 32-bit bijection (Wellons' "lowbias32"), for ids that must never collide.
pub(crate) fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// xoshiro256**: fast, 256 bits of state, good statistical quality.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    s: [u64; 4],
    /// The polar method makes normals in pairs: the second one, kept.
    spare_normal: Option<f64>,
}

impl Rng {
    /// An independent stream for `(seed, stream, index)`: each simulated
    /// actor owns one, so its draws do not depend on any other actor's.
    pub(crate) fn new(seed: u64, stream: u64, index: u64) -> Self {
        let mut sm = mix64(seed ^ mix64(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index));
        let mut s = [0u64; 4];
        for word in &mut s {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *word = mix64(sm);
        }
        if s == [0; 4] {
            // The one state xoshiro cannot leave; unreachable in practice.
            s[0] = 1;
        }
        Self {
            s,
            spare_normal: None,
        }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 bits.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in (0, 1], safe for `ln`.
    pub(crate) fn unit_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n) (multiply-high; the bias is below 2^-32 for
    /// the small `n` used here). `n` must be positive.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform index into a slice of length `n`.
    pub(crate) fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform integer in [lo, hi] (inclusive).
    pub(crate) fn int_in(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }

    /// Uniform real in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponential with the given mean.
    pub(crate) fn exponential(&mut self, mean: f64) -> f64 {
        -mean * ln(self.unit_open())
    }

    /// Standard normal (Marsaglia's polar method: needs only `ln` and `sqrt`).
    pub(crate) fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.unit() - 1.0;
            let v = 2.0 * self.unit() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let scale = (-2.0 * ln(s) / s).sqrt();
                self.spare_normal = Some(v * scale);
                return u * scale;
            }
        }
    }

    /// Lognormal with the given median and log-space standard deviation.
    pub(crate) fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * exp(sigma * self.normal())
    }

    /// Pareto with scale `xm` (the minimum) and shape `alpha`.
    pub(crate) fn pareto(&mut self, xm: f64, alpha: f64) -> f64 {
        xm * exp(-ln(self.unit_open()) / alpha)
    }

    /// Geometric on {1, 2, ...} with the given mean (>= 1).
    pub(crate) fn geometric(&mut self, mean: f64) -> u32 {
        if mean <= 1.0 {
            return 1;
        }
        let q = 1.0 - 1.0 / mean;
        let k = (ln(self.unit_open()) / ln(q)).floor();
        1 + k.min(1.0e6) as u32
    }

    /// Index drawn with the given integer weights (not all zero).
    pub(crate) fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut pick = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if pick < u64::from(w) {
                return i;
            }
            pick -= u64::from(w);
        }
        weights.len() - 1
    }

    /// Fisher-Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

/// `e^x`, deterministic: Cody-Waite reduction by ln 2 and a degree-13 Taylor
/// polynomial on |r| <= ln(2)/2 (error below 1e-16 relative).
pub(crate) fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    if x < -708.0 {
        return 0.0;
    }
    // ln 2 split in two (fdlibm's constants), so k * LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    let k = (x * LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Horner form of sum r^n / n!, n = 0..=13.
    let mut p = 1.0 / 6_227_020_800.0;
    for d in [
        479_001_600.0,
        39_916_800.0,
        3_628_800.0,
        362_880.0,
        40_320.0,
        5_040.0,
        720.0,
        120.0,
        24.0,
        6.0,
        2.0,
        1.0,
        1.0,
    ] {
        p = p * r + 1.0 / d;
    }
    let bits = ((k as i64 + 1023) as u64) << 52;
    p * f64::from_bits(bits)
}

/// Natural logarithm, deterministic: x = m * 2^e with m in [1/sqrt2, sqrt2),
/// ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172, series to s^21.
/// Defined for positive normal numbers (the simulator never passes others);
/// returns NaN for x <= 0 or NaN and infinity for infinity.
pub(crate) fn ln(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return f64::NAN;
    }
    if x.is_infinite() {
        return x;
    }
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7FF) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
    if m > SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 21.0;
    for d in [19.0, 17.0, 15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0, 1.0] {
        p = p * s2 + 1.0 / d;
    }
    e as f64 * LN_2 + 2.0 * s * p
}

/// Cosine, deterministic, for the moderate arguments the daily cycle uses:
/// reduced to [0, pi/2] by symmetry, then a Taylor polynomial to r^20.
pub(crate) fn cos(x: f64) -> f64 {
    let mut r = x - (x / TAU).round() * TAU; // [-pi, pi]
    if r < 0.0 {
        r = -r;
    }
    let (r, sign) = if r > FRAC_PI_2 {
        (PI - r, -1.0)
    } else {
        (r, 1.0)
    };
    let r2 = r * r;
    // sum (-1)^n r^(2n) / (2n)!, n = 0..=10, each term from the previous one.
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..=10u32 {
        let k = f64::from(2 * n);
        term *= -r2 / ((k - 1.0) * k);
        sum += term;
    }
    sign * sum
}

#[cfg(test)]
mod tests {
    use super::Rng;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, 1, 2).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut x = Rng::new(7, 1, 2);
        let mut y = Rng::new(7, 1, 3);
        let mut z = Rng::new(8, 1, 2);
        let (x0, y0, z0) = (x.next_u64(), y.next_u64(), z.next_u64());
        assert_ne!(x0, y0);
        assert_ne!(x0, z0);
    }

    #[test]
    fn distributions_have_the_right_means() {
        let mut rng = Rng::new(1, 0, 0);
        let n = 200_000;
        let exp_mean: f64 = (0..n).map(|_| rng.exponential(3.0)).sum::<f64>() / n as f64;
        assert!((exp_mean - 3.0).abs() < 0.05, "{exp_mean}");
        let normals: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = normals.iter().sum::<f64>() / n as f64;
        let var = normals.iter().map(|z| (z - mean) * (z - mean)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        let geo: f64 = (0..n).map(|_| f64::from(rng.geometric(5.0))).sum::<f64>() / n as f64;
        assert!((geo - 5.0).abs() < 0.1, "{geo}");
        let mut hits = [0u32; 3];
        for _ in 0..n {
            hits[rng.weighted(&[1, 2, 7])] += 1;
        }
        assert!((f64::from(hits[2]) / n as f64 - 0.7).abs() < 0.01);
    }

    proptest! {
        #[test]
        fn exp_matches_libm(x in -700.0f64..700.0) {
            let (ours, theirs) = (exp(x), x.exp());
            prop_assert!(((ours - theirs) / theirs).abs() < 1e-14, "{x}: {ours} vs {theirs}");
        }

        #[test]
        fn ln_matches_libm(x in 1e-300f64..1e300) {
            let (ours, theirs) = (ln(x), x.ln());
            prop_assert!((ours - theirs).abs() <= 1e-14 * theirs.abs().max(1.0), "{x}: {ours} vs {theirs}");
        }

        #[test]
        fn cos_matches_libm(x in -20.0f64..20.0) {
            prop_assert!((cos(x) - x.cos()).abs() < 1e-13, "{x}");
        }
    }
}

//! Token sampling, following ds4 exactly (server.md §4): temperature, top-k, top-p, min-p
//! over f32 logits, a seedable xorshift64* generator, and top-N log-probabilities.
//!
//! All arithmetic is f32 as in ds4 (weights `exp((l - max) / T)`, running sums, one
//! uniform draw per non-greedy token). The only documented difference: candidates with
//! equal logits are ordered by id (stable sort) where ds4 uses `qsort`.
//!
//! [`Sampler`] keeps its candidate / weight buffers between calls, so decoding does no
//! per-token allocation once the buffers have grown to the vocabulary size.

/// Most candidates kept by the top-k path (ds4 caps `top_k` at 1024).
pub const MAX_TOP_K: usize = 1024;

/// Sampling parameters. Defaults are the ds4 CLI / server defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// ≤ 0 means greedy (argmax).
    pub temperature: f32,
    /// ≤ 0 means off (full-vocabulary path); otherwise capped at 1024 and the vocabulary.
    pub top_k: i32,
    /// Nucleus mass; values ≤ 0 or > 1 mean 1 (off).
    pub top_p: f32,
    /// Keep tokens with probability ≥ `min_p` × probability of the best token; < 0 means 0.
    pub min_p: f32,
    /// RNG seed. 0 is a valid state here (the generator maps it to a fixed constant);
    /// callers wanting ds4's "0 = time based" use [`time_seed`].
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.temperature.is_nan()
    }
}

/// xorshift64* (Vigna): state `x`; `x ^= x >> 12; x ^= x << 25; x ^= x >> 27`; output
/// `x * 0x2545F4914F6CDD1D`. A zero state is replaced by `0x9E3779B97F4A7C15` (xorshift
/// never leaves 0). This is ds4's generator, so equal seeds give ds4's draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        if x == 0 {
            x = 0x9E37_79B9_7F4A_7C15;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1) with 24 bits: `((out >> 40) & 0xFFFFFF) / 2^24`.
    pub fn next_f32(&mut self) -> f32 {
        let bits = (self.next_u64() >> 40) & 0x00FF_FFFF;
        bits as f32 / 16_777_216.0
    }
}

/// A seed from the clock and process id, for "seed unset" (ds4 CLI style:
/// time ^ (pid << 32) ^ sub-second clock), mixed with `salt` (e.g. a request counter).
pub fn time_seed(salt: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let pid = u64::from(std::process::id());
    let seed = now.as_secs() ^ (pid << 32) ^ u64::from(now.subsec_nanos()) ^ salt.rotate_left(17);
    if seed == 0 { 1 } else { seed }
}

/// The lowest index holding the largest value (strict `>` scan from −∞; NaN never wins).
/// Returns 0 for an empty or all-NaN/−∞ slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0u32;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i as u32;
        }
    }
    best
}

/// `ln Σ exp(l)` over the finite logits, in f64. −∞ if none is finite.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let max = f64::from(max);
    let sum: f64 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| (f64::from(v) - max).exp())
        .sum();
    max + sum.ln()
}

/// One entry of a top-N log-probability list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logit: f32,
    /// `logit − logsumexp(all finite logits)` of the unmodified logits.
    pub logprob: f32,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
    weight: f32,
}

/// Stateful sampler: configuration, RNG and reusable scratch.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Rng,
    cand: Vec<Candidate>,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        Self {
            config,
            rng: Rng::new(config.seed),
            cand: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Changes parameters for following tokens; the RNG continues unless the seed changed.
    pub fn set_config(&mut self, config: SamplerConfig) {
        if config.seed != self.config.seed {
            self.rng = Rng::new(config.seed);
        }
        self.config = config;
    }

    pub fn rng(&self) -> Rng {
        self.rng
    }

    /// Picks the next token with the configured parameters.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = self.config;
        self.sample_with(logits, c.temperature, c.top_k, c.top_p, c.min_p)
    }

    /// Picks the next token with explicit parameters (e.g. greedy forcing inside DSML),
    /// drawing from this sampler's RNG.
    pub fn sample_with(
        &mut self,
        logits: &[f32],
        temperature: f32,
        top_k: i32,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        if temperature.is_nan() || temperature <= 0.0 {
            return argmax(logits);
        }
        let top_p = if top_p <= 0.0 || top_p > 1.0 || top_p.is_nan() {
            1.0
        } else {
            top_p
        };
        let min_p = if min_p > 0.0 { min_p } else { 0.0 };
        if top_k <= 0 {
            self.sample_full_vocab(logits, temperature, top_p, min_p)
        } else {
            let k = (top_k as usize).min(MAX_TOP_K).min(logits.len());
            self.sample_top_k(logits, k, temperature, top_p, min_p)
        }
    }

    fn sample_full_vocab(
        &mut self,
        logits: &[f32],
        temperature: f32,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        let mut max_logit = f32::NEG_INFINITY;
        let mut best = 0u32;
        let mut finite = 0usize;
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            finite += 1;
            if v > max_logit {
                max_logit = v;
                best = i as u32;
            }
        }
        if finite == 0 {
            return argmax(logits);
        }

        self.cand.clear();
        if top_p >= 1.0 {
            // Vocabulary order; candidates are tokens whose weight relative to the best
            // token is at least min_p.
            let mut sum = 0.0f32;
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let w = ((v - max_logit) / temperature).exp();
                if w < min_p {
                    continue;
                }
                sum += w;
                self.cand.push(Candidate {
                    id: i as u32,
                    logit: v,
                    weight: w,
                });
            }
            if sum <= 0.0 || !sum.is_finite() {
                return best;
            }
            let mut r = self.rng.next_f32() * sum;
            for c in &self.cand {
                r -= c.weight;
                if r <= 0.0 {
                    return c.id;
                }
            }
            return best;
        }

        let mut sum = 0.0f32;
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let w = ((v - max_logit) / temperature).exp();
            sum += w;
            self.cand.push(Candidate {
                id: i as u32,
                logit: v,
                weight: w,
            });
        }
        if sum <= 0.0 || !sum.is_finite() {
            return best;
        }
        // Stable: equal logits keep id order.
        self.cand.sort_by(|a, b| b.logit.total_cmp(&a.logit));
        let kept = truncate(&self.cand, sum, top_p, min_p);
        self.draw(kept).unwrap_or(best)
    }

    fn sample_top_k(
        &mut self,
        logits: &[f32],
        k: usize,
        temperature: f32,
        top_p: f32,
        min_p: f32,
    ) -> u32 {
        if k == 0 {
            return argmax(logits);
        }
        select_top(logits, k, &mut self.cand);
        let Some(first) = self.cand.first() else {
            return argmax(logits);
        };
        let max_logit = first.logit;
        let first_id = first.id;
        let mut sum = 0.0f32;
        for c in &mut self.cand {
            c.weight = ((c.logit - max_logit) / temperature).exp();
            sum += c.weight;
        }
        if sum <= 0.0 || !sum.is_finite() {
            return first_id;
        }
        let kept = truncate(&self.cand, sum, top_p, min_p);
        self.draw(kept).unwrap_or(first_id)
    }

    /// One draw among the first `kept` candidates (descending order), ds4 style.
    fn draw(&mut self, kept: usize) -> Option<u32> {
        let kept_cands = self.cand.get(..kept)?;
        let last = kept_cands.last()?;
        let filtered_sum: f32 = kept_cands.iter().fold(0.0, |s, c| s + c.weight);
        let mut r = self.rng.next_f32() * filtered_sum;
        for c in kept_cands {
            r -= c.weight;
            if r <= 0.0 {
                return Some(c.id);
            }
        }
        Some(last.id)
    }

    /// The `n` highest logits with their log-probabilities (log-softmax of the unmodified
    /// logits, normaliser in f64), highest first, ties by lower id. Reuses `out`.
    pub fn top_logprobs(&mut self, logits: &[f32], n: usize, out: &mut Vec<TokenLogprob>) {
        out.clear();
        if n == 0 {
            return;
        }
        let lse = log_sum_exp(logits);
        select_top(logits, n.min(logits.len()), &mut self.cand);
        out.extend(self.cand.iter().map(|c| TokenLogprob {
            id: c.id,
            logit: c.logit,
            logprob: (f64::from(c.logit) - lse) as f32,
        }));
    }
}

/// Log-probability of one token under the unmodified logits (−∞ for a non-finite logit
/// or an out-of-range id).
pub fn token_logprob(logits: &[f32], id: u32) -> f32 {
    match logits.get(id as usize) {
        Some(&v) if v.is_finite() => (f64::from(v) - log_sum_exp(logits)) as f32,
        _ => f32::NEG_INFINITY,
    }
}

/// Fills `out` with the `k` largest finite logits, descending; equal logits keep the lower
/// id first (insertion as in ds4).
fn select_top(logits: &[f32], k: usize, out: &mut Vec<Candidate>) {
    out.clear();
    if k == 0 {
        return;
    }
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        if out.len() == k && out.last().is_some_and(|last| v <= last.logit) {
            continue;
        }
        if out.len() == k {
            out.pop();
        }
        // First position whose logit is < v: after all equal ones (lower ids).
        let pos = out.partition_point(|c| c.logit >= v);
        out.insert(
            pos,
            Candidate {
                id: i as u32,
                logit: v,
                weight: 0.0,
            },
        );
    }
}

/// How many of the descending candidates survive min-p and top-p: the first always; then
/// while `p_i ≥ p_0 · min_p`, stopping after the one that brings the mass to ≥ top_p.
fn truncate(cand: &[Candidate], sum: f32, top_p: f32, min_p: f32) -> usize {
    let Some(first) = cand.first() else {
        return 0;
    };
    let min_prob = (first.weight / sum) * min_p;
    let mut filtered_sum = 0.0f32;
    let mut kept = 0;
    for (i, c) in cand.iter().enumerate() {
        let p = c.weight / sum;
        if i > 0 && p < min_prob {
            break;
        }
        filtered_sum += c.weight;
        kept += 1;
        if filtered_sum / sum >= top_p {
            break;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose softmax (T = 1) is exactly proportional to `probs`.
    fn logits_for(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    /// Draw `n` samples and return per-id counts.
    fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits) as usize] += 1;
        }
        counts
    }

    /// Each frequency within 5 binomial standard deviations of its expected probability.
    fn assert_freqs(counts: &[usize], expected: &[f64]) {
        let n: usize = counts.iter().sum();
        for (id, (&c, &p)) in counts.iter().zip(expected).enumerate() {
            let mean = p * n as f64;
            let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1.0);
            assert!(
                (c as f64 - mean).abs() <= 5.0 * sd,
                "id {id}: {c} draws, expected {mean:.0} ± {sd:.0} (counts {counts:?})"
            );
        }
    }

    fn cfg(temperature: f32, top_k: i32, top_p: f32, min_p: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: 12345,
        }
    }

    #[test]
    fn xorshift64star_reference_values() {
        // Reference values computed independently (Python big-int arithmetic).
        let mut r = Rng::new(1);
        assert_eq!(r.next_u64(), 0x47E4_CE4B_896C_DD1D);
        assert_eq!(r.next_u64(), 0xABCF_A6A8_E079_651D);
        assert_eq!(r.next_u64(), 0xB9D1_0D8F_EB73_1F57);
        // Zero state uses the golden-ratio constant instead.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0x0D83_B3E2_9A21_487A);
        assert_eq!(r.next_u64(), 0x54C4_4C79_F1FE_9D67);
        let mut r = Rng::new(12345);
        // u = k / 2^24 exactly: compare the 24-bit numerators.
        for k in [9_983_995.0f32, 12_635_834.0, 1_284_558.0] {
            assert_eq!(r.next_f32() * 16_777_216.0, k);
        }
    }

    #[test]
    fn greedy_is_lowest_index_of_max() {
        let logits = [1.0, 5.0, f32::NAN, 5.0, -2.0];
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(cfg(-1.0, 5, 0.5, 0.5));
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        // Greedy draws nothing from the RNG.
        assert_eq!(s.rng(), Rng::new(12345));
    }

    #[test]
    fn full_vocab_frequencies_match_softmax() {
        let probs = [0.4, 0.25, 0.2, 0.1, 0.05];
        let logits = logits_for(&probs);
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0));
        let counts = histogram(&mut s, &logits, 200_000);
        assert_freqs(&counts, &probs);
    }

    #[test]
    fn temperature_sharpens() {
        // T = 0.5 squares the probabilities before renormalising.
        let probs = [0.5, 0.3, 0.2];
        let logits = logits_for(&probs);
        let sq: Vec<f64> = probs.iter().map(|p| p * p).collect();
        let z: f64 = sq.iter().sum();
        let expected: Vec<f64> = sq.iter().map(|p| p / z).collect();
        let mut s = Sampler::new(cfg(0.5, 0, 1.0, 0.0));
        assert_freqs(&histogram(&mut s, &logits, 200_000), &expected);
    }

    #[test]
    fn min_p_excludes_exactly_the_low_tokens() {
        // Relative weights 1, 0.6, 0.3, 0.1: min_p 0.25 keeps ids 0..=2 only.
        let probs = [0.5, 0.3, 0.15, 0.05];
        let logits = logits_for(&probs);
        for top_k in [0, 4] {
            let mut s = Sampler::new(cfg(1.0, top_k, 1.0, 0.25));
            let counts = histogram(&mut s, &logits, 100_000);
            assert_eq!(counts[3], 0, "top_k {top_k}");
            assert_freqs(&counts, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Cumulative 0.5, 0.8, …: top_p 0.75 stops after the second token.
        let probs = [0.3, 0.5, 0.05, 0.15];
        let logits = logits_for(&probs);
        for top_k in [0, 2, 4, 1000] {
            let mut s = Sampler::new(cfg(1.0, top_k, 0.75, 0.0));
            let counts = histogram(&mut s, &logits, 100_000);
            assert_eq!((counts[2], counts[3]), (0, 0), "top_k {top_k}");
            assert_freqs(&counts, &[0.3 / 0.8, 0.5 / 0.8, 0.0, 0.0]);
        }
    }

    #[test]
    fn top_k_keeps_the_k_best_and_prefers_lower_ids_on_ties() {
        let logits = [1.0, 3.0, 3.0, 2.0, f32::INFINITY, f32::NAN];
        let mut s = Sampler::new(cfg(1.0, 1, 1.0, 0.0));
        assert!(histogram(&mut s, &logits, 1000)[1] == 1000);
        let mut s = Sampler::new(cfg(1.0, 2, 1.0, 0.0));
        let counts = histogram(&mut s, &logits, 100_000);
        assert_eq!(counts[0] + counts[3] + counts[4] + counts[5], 0);
        assert_freqs(&counts, &[0.0, 0.5, 0.5, 0.0, 0.0, 0.0]);
        let mut s = Sampler::new(cfg(1.0, 3, 1.0, 0.0));
        let counts = histogram(&mut s, &logits, 100_000);
        let e = std::f64::consts::E;
        let z = 2.0 * e * e + e;
        assert_freqs(&counts, &[0.0, e * e / z, e * e / z, e / z, 0.0, 0.0]);
    }

    #[test]
    fn non_finite_logits_are_never_sampled() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NAN, 0.0, f32::INFINITY];
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0));
        let counts = histogram(&mut s, &logits, 10_000);
        assert_eq!(counts[0] + counts[2] + counts[4], 0);
        let mut s = Sampler::new(cfg(1.0, 0, 0.9, 0.0));
        let counts = histogram(&mut s, &logits, 10_000);
        assert_eq!(counts[0] + counts[2] + counts[4], 0);
        // No finite logit at all: argmax fallback (+inf wins).
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.0));
        assert_eq!(s.sample(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]), 1);
    }

    #[test]
    fn large_vocab_head_frequencies() {
        // 129280 logits: a few strong tokens over a flat tail that min_p removes.
        let mut logits = vec![-10.0f32; 129_280];
        let head = [(7usize, 2.0f32), (70_000, 1.0), (129_279, 0.0)];
        for &(i, l) in &head {
            logits[i] = l;
        }
        let z: f64 = head.iter().map(|&(_, l)| f64::from(l).exp()).sum();
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.05));
        let mut counts = [0usize; 4];
        for _ in 0..5_000 {
            let id = s.sample(&logits) as usize;
            let slot = head.iter().position(|&(i, _)| i == id).unwrap_or(3);
            counts[slot] += 1;
        }
        let expected: Vec<f64> = head
            .iter()
            .map(|&(_, l)| f64::from(l).exp() / z)
            .chain([0.0])
            .collect();
        assert_freqs(&counts, &expected);
        assert_eq!(counts[3], 0);
    }

    #[test]
    fn same_seed_same_stream() {
        let logits = logits_for(&[0.25, 0.25, 0.25, 0.25]);
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                seed,
                min_p: 0.0,
                ..SamplerConfig::default()
            });
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_logprobs_are_sorted_log_softmax() {
        let logits = [0.5f32, 2.0, -1.0, 2.0, f32::NEG_INFINITY, 1.0];
        let z: f64 = logits
            .iter()
            .filter(|v| v.is_finite())
            .map(|&v| f64::from(v).exp())
            .sum();
        let mut s = Sampler::new(SamplerConfig::default());
        let mut out = Vec::new();
        s.top_logprobs(&logits, 3, &mut out);
        let ids: Vec<u32> = out.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 5]);
        for t in &out {
            let want = (f64::from(logits[t.id as usize]).exp() / z).ln();
            assert!(
                (f64::from(t.logprob) - want).abs() < 1e-6,
                "{t:?} vs {want}"
            );
        }
        assert!((f64::from(token_logprob(&logits, 2)) - ((-1.0f64).exp() / z).ln()).abs() < 1e-6);
        assert_eq!(token_logprob(&logits, 4), f32::NEG_INFINITY);
        assert_eq!(token_logprob(&logits, 99), f32::NEG_INFINITY);
        s.top_logprobs(&logits, 100, &mut out);
        assert_eq!(out.len(), 5);
        let total: f64 = out.iter().map(|t| f64::from(t.logprob).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn scratch_is_reused() {
        let logits: Vec<f32> = (0..50_000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let mut s = Sampler::new(cfg(1.0, 0, 0.9, 0.0));
        s.sample(&logits);
        let cap = s.cand.capacity();
        let ptr = s.cand.as_ptr();
        for _ in 0..20 {
            s.sample(&logits);
        }
        assert_eq!((s.cand.capacity(), s.cand.as_ptr()), (cap, ptr));
    }
}

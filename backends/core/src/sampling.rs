//! Next-token selection from one row of logits, in HF `generate`'s order: repetition penalty,
//! then (unless greedy) temperature, top-k, top-p, min-p, and a draw from the per-sequence RNG.

use llm_abi::{SamplingParams, SeqOutput, MAX_TOP_LOGPROBS};

/// xoshiro256** seeded through splitmix64: small, fast, and the same stream on every platform,
/// so a seed reproduces a generation anywhere.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
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

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// HF `RepetitionPenaltyLogitsProcessor`: for every token already seen (prompt included),
/// positive logits are divided by the penalty and negative ones multiplied.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            let l = &mut logits[t];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

fn argmax(logits: &[f32]) -> usize {
    // First maximum, as torch.argmax returns it.
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// Choose the next token. `logits` is one row (modified in place by the penalty); `history` is
/// every token of the sequence so far.
pub fn sample(logits: &mut [f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> SeqOutput {
    apply_repetition_penalty(logits, history, p.repetition_penalty);
    let token = if p.temperature == 0.0 {
        argmax(logits)
    } else {
        draw(logits, p, rng)
    };
    let mut out = SeqOutput {
        token: token as u32,
        ..SeqOutput::default()
    };
    if p.logprobs != 0 {
        // Logprobs of the model's distribution after penalties, before temperature and filters
        // (what vLLM reports by default): comparable across sampling settings.
        let lp = log_softmax(logits);
        out.logprob = lp[token];
        let k = (p.top_logprobs as usize)
            .min(MAX_TOP_LOGPROBS)
            .min(lp.len());
        if k > 0 {
            let mut idx: Vec<usize> = (0..lp.len()).collect();
            idx.select_nth_unstable_by(k - 1, |&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
            idx.truncate(k);
            idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
            for (n, &i) in idx.iter().enumerate() {
                out.top_ids[n] = i as u32;
                out.top_logprobs[n] = lp[i];
            }
            out.n_top = k as u32;
        }
    }
    out
}

/// Temperature, top-k, top-p, min-p (HF warpers), then a draw.
fn draw(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> usize {
    let t = p.temperature;
    // Candidates sorted by logit, descending (index breaks ties for determinism).
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let scaled: Vec<f64> = idx.iter().map(|&i| (logits[i] / t) as f64).collect();
    let mut keep = scaled.len();
    if p.top_k > 0 && (p.top_k as usize) < keep {
        // HF TopKLogitsWarper keeps everything >= the k-th value (ties at the boundary kept).
        let kth = scaled[p.top_k as usize - 1];
        keep = scaled.iter().take_while(|&&s| s >= kth).count();
    }
    let max = scaled[0];
    let mut probs: Vec<f64> = scaled[..keep].iter().map(|s| (s - max).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= z);
    if p.top_p < 1.0 {
        // HF TopPLogitsWarper: drop the tail whose cumulative mass (ascending) is <= 1 - top_p,
        // i.e. keep the smallest head whose mass reaches top_p; at least one token.
        let mut cum = 0.0;
        let mut n = 0;
        for q in &probs {
            n += 1;
            cum += q;
            if cum >= p.top_p as f64 {
                break;
            }
        }
        keep = n.max(1);
    }
    if p.min_p > 0.0 {
        let floor = probs[0] * p.min_p as f64;
        keep = probs[..keep]
            .iter()
            .take_while(|&&q| q >= floor)
            .count()
            .max(1);
    }
    let z: f64 = probs[..keep].iter().sum();
    let mut u = rng.next_f64() * z;
    for (n, q) in probs[..keep].iter().enumerate() {
        if u < *q {
            return idx[n];
        }
        u -= q;
    }
    idx[keep - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut l = vec![0.0, 3.0, 3.0, -1.0];
        assert_eq!(sample(&mut l, &[], &params(), &mut Rng::new(0)).token, 1);
    }

    /// The engine takes plain greedy rows' argmax with Burn's `argmax` on the device instead of
    /// `sample` (`Engine::step_batch`): both must pick the first maximum, ties included.
    #[test]
    fn burn_argmax_is_greedys_first_max() {
        use burn_tensor::{Tensor, TensorData};
        let rows = [
            vec![0.0f32, 3.0, 3.0, -1.0],
            vec![2.0, 2.0, 2.0, 2.0],
            vec![-5.0, -4.0, -4.0, -6.0],
            vec![1.0, 0.5, 7.0, 7.0],
        ];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let t = Tensor::<crate::export::Cpu, 2>::from_data(
            TensorData::new(flat, [rows.len(), 4]),
            &Default::default(),
        );
        let device: Vec<i64> = t.argmax(1).into_data().iter::<i64>().collect();
        let host: Vec<i64> = rows
            .iter()
            .map(|r| sample(&mut r.clone(), &[], &params(), &mut Rng::new(0)).token as i64)
            .collect();
        assert_eq!(device, vec![1, 0, 1, 2]);
        assert_eq!(device, host);
    }

    #[test]
    fn repetition_penalty_matches_hf() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn seeded_draws_repeat_and_respect_top_k() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..params()
        };
        let logits = vec![1.0, 0.9, 0.8, 5.0, -3.0];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| sample(&mut logits.clone(), &[], &p, &mut rng).token)
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        assert!(a.iter().all(|&t| t == 3 || t == 0), "{a:?}");
    }

    #[test]
    fn top_p_keeps_smallest_head() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps two tokens.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            ..params()
        };
        let logits = vec![3.0, 2.0, 1.0, 0.0];
        let mut rng = Rng::new(1);
        let seen: std::collections::BTreeSet<u32> = (0..400)
            .map(|_| sample(&mut logits.clone(), &[], &p, &mut rng).token)
            .collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let p = SamplingParams {
            logprobs: 1,
            top_logprobs: 3,
            ..params()
        };
        let out = sample(&mut [0.0, 2.0, 1.0, -1.0], &[], &p, &mut Rng::new(0));
        assert_eq!(&out.top_ids[..3], &[1, 2, 0]);
        let total: f32 = [0.0f32, 2.0, 1.0, -1.0]
            .iter()
            .map(|l| (l - 2.0f32).exp())
            .sum();
        assert!((out.logprob - (-total.ln())).abs() < 1e-6);
    }
}

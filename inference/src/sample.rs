//! Sampling parameters and the sampler: greedy, or temperature with top-k and top-p, from a
//! seeded generator; optionally restricted to the tokens a constraint accepts.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most stop sequences a request may carry.
pub const MAX_STOP_SEQUENCES: usize = 8;

/// How tokens are chosen and when generation stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy). 0..=5.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches this. (0, 1].
    pub top_p: Option<f32>,
    /// Keep only this many most likely tokens. >= 1.
    pub top_k: Option<usize>,
    /// Seed of the sampler: the same seed, prompt and parameters give the same output.
    pub seed: u64,
    /// Most tokens to generate. >= 1.
    pub max_tokens: usize,
    /// Generation stops before the first of these; it is not part of the output.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: None,
            top_k: None,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens`.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || !(0.0..=5.0).contains(&self.temperature) {
            return Err(Error::InvalidRequest(format!(
                "temperature must be in 0..=5, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p
            && (!p.is_finite() || p <= 0.0 || p > 1.0)
        {
            return Err(Error::InvalidRequest(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::InvalidRequest("top_k must be at least 1".into()));
        }
        if self.max_tokens == 0 {
            return Err(Error::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES || self.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidRequest(format!(
                "stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences"
            )));
        }
        Ok(())
    }
}

/// Candidates kept by constrained sampling when `top_k` is not set.
const CONSTRAINED_DEFAULT_K: usize = 64;

pub(crate) struct Sampler {
    params: SamplingParams,
    rng: fastrand::Rng,
}

impl Sampler {
    pub(crate) fn new(params: &SamplingParams) -> Self {
        Self {
            params: params.clone(),
            rng: fastrand::Rng::with_seed(params.seed),
        }
    }

    fn greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// Picks the next token from `logits`. With `valid`, only tokens it accepts are
    /// considered (checked in order of likelihood until enough are found); `None` when no
    /// token is acceptable.
    pub(crate) fn pick(
        &mut self,
        logits: &[f32],
        mut valid: Option<&mut dyn FnMut(u32) -> bool>,
    ) -> Option<u32> {
        let greedy = self.greedy();
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let wanted = match (&valid, greedy) {
            (_, true) => 1,
            (Some(_), false) => self.params.top_k.unwrap_or(CONSTRAINED_DEFAULT_K),
            (None, false) => self.params.top_k.unwrap_or(order.len()),
        };
        if greedy && valid.is_none() {
            return order.into_iter().min_by(by_logit);
        }
        if valid.is_none() && wanted < order.len() {
            order.select_nth_unstable_by(wanted, by_logit);
            order.truncate(wanted);
        }
        order.sort_unstable_by(by_logit);
        let candidates: Vec<u32> = match valid.as_mut() {
            None => order,
            Some(ok) => order.into_iter().filter(|&t| ok(t)).take(wanted).collect(),
        };
        if candidates.is_empty() {
            return None;
        }
        if greedy {
            return Some(candidates[0]);
        }
        let t = f64::from(self.params.temperature);
        let max = f64::from(logits[candidates[0] as usize]);
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&c| ((f64::from(logits[c as usize]) - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.params.top_p {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.f64() * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return Some(candidates[i]);
            }
            r -= p;
        }
        candidates.get(probs.len() - 1).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_valid() {
        let logits = [0.1, 3.0, 2.0, -1.0];
        let mut s = Sampler::new(&SamplingParams::greedy(1));
        assert_eq!(s.pick(&logits, None), Some(1));
        let mut not_one = |t: u32| t != 1;
        assert_eq!(s.pick(&logits, Some(&mut not_one)), Some(2));
        let mut none = |_| false;
        assert_eq!(s.pick(&logits, Some(&mut none)), None);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: Some(3),
            seed: 7,
            ..SamplingParams::default()
        };
        let run = || {
            let mut s = Sampler::new(&params);
            (0..50).map(|_| s.pick(&logits, None)).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().all(|t| t.is_some_and(|t| t % 7 == 6)));
    }

    #[test]
    fn bad_params_are_named() {
        let p = SamplingParams {
            top_p: Some(1.5),
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
    }
}

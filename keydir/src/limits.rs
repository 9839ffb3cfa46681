//! Claim rate limits per requesting device and per target user: token
//! buckets in this process, refilled through tokio's clock (so tests can
//! pause time). With several keydir processes each enforces its own share.

use std::collections::HashMap;
use std::sync::Mutex;

use proto::{ApiError, ErrorCode};
use tokio::time::Instant;

/// Buckets kept before idle full ones are dropped.
const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimits {
    per_requester: f64,
    per_user: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimits {
    pub fn new(per_requester_per_minute: u32, per_user_per_minute: u32) -> Self {
        Self {
            per_requester: f64::from(per_requester_per_minute),
            per_user: f64::from(per_user_per_minute),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from the requester's and the target's buckets.
    pub fn check(&self, requester: &str, user: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut b = self.buckets.lock().map_err(|_| ApiError::new(ErrorCode::Internal, "rate limiter poisoned"))?;
        if b.len() > MAX_BUCKETS {
            b.retain(|_, v| now.duration_since(v.at).as_secs() < 60);
        }
        let keys = [(format!("r:{requester}"), self.per_requester), (format!("u:{user}"), self.per_user)];
        for (k, per_minute) in &keys {
            let e = b.entry(k.clone()).or_insert(Bucket { tokens: *per_minute, at: now });
            e.tokens = (e.tokens + now.duration_since(e.at).as_secs_f64() * per_minute / 60.0).min(*per_minute);
            e.at = now;
            if e.tokens < 1.0 {
                return Err(ApiError::new(ErrorCode::RateLimited, "too many KeyPackage claims; slow down"));
            }
        }
        for (k, _) in &keys {
            if let Some(e) = b.get_mut(k) {
                e.tokens -= 1.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_with_time() {
        let l = RateLimits::new(2, 100);
        assert!(l.check("a", "u").is_ok());
        assert!(l.check("a", "u").is_ok());
        assert_eq!(l.check("a", "u").map_err(|e| e.code), Err(ErrorCode::RateLimited));
        assert!(l.check("b", "u").is_ok(), "limits are per requester");
        tokio::time::advance(std::time::Duration::from_secs(30)).await;
        assert!(l.check("a", "u").is_ok());
        assert!(l.check("a", "u").is_err());
    }
}

//! Request IDs: an incoming `X-Request-Id` is kept (when it is a sane token) or one is made, echoed in the answer,
//! and named on every log line about the request, so that a client's report and the gateway's log meet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::support::random;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming ID kept; a longer or odd one is replaced, so that a client cannot fill the logs.
const MAX_LEN: usize = 128;

/// The request's ID, kept in its extensions for whoever logs about it.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// The client's ID when it is 1–128 visible ASCII characters, otherwise a new one.
    pub fn of(headers: &HeaderMap) -> Self {
        let given = headers
            .get(&HEADER)
            .filter(|v| !v.is_empty() && v.len() <= MAX_LEN && v.as_bytes().iter().all(|b| b.is_ascii_graphic()));
        match given {
            Some(v) => RequestId(v.clone()),
            None => RequestId(new_id()),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only visible ASCII ever gets here (checked above, or made so).
        self.0.to_str().unwrap_or_default()
    }
}

/// `<process prefix>-<counter>`: unique within the process and, by its random prefix, across restarts and
/// replicas, without a random draw per request.
fn new_id() -> HeaderValue {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        // Without the kernel's random source, the process id and the start time still tell restarts and replicas
        // apart (where a prefix of zeros would not).
        random::hex::<6>().unwrap_or_else(|_| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            format!("{:06x}{:06x}", std::process::id() & 0xff_ffff, nanos & 0xff_ffff)
        })
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hex digits and a dash are always a valid header value.
    HeaderValue::from_str(&format!("{prefix}-{n:x}")).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_client_id_is_kept_and_anything_else_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(RequestId::of(&headers).as_str(), "abc-123");
        headers.insert(HEADER, HeaderValue::from_static("has space"));
        assert_ne!(RequestId::of(&headers).as_str(), "has space");
        headers.insert(HEADER, HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(RequestId::of(&headers).as_str().len(), 12 + 1 + 1);
    }

    #[test]
    fn made_ids_differ() {
        let headers = HeaderMap::new();
        assert_ne!(RequestId::of(&headers).as_str(), RequestId::of(&headers).as_str());
    }
}

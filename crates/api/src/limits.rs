//! Named limits of the API, and the per-client rate limiter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hie_domain::OdsCode;

/// Connections the API listener holds at once, TLS handshakes included.
pub const CONNECTIONS_MAX: usize = 1024;
/// Connections from one source address (an IPv6 address's /64), TLS
/// handshakes included: one address cannot take every slot.
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 256;
/// TLS handshakes in progress from one source address: a flood of idle or
/// slow handshakes from one address holds at most this many slots, each for
/// at most the handshake timeout.
pub const HANDSHAKES_PER_ADDRESS_MAX: usize = 32;
/// Connections one organisation (the ODS code of its certificates) holds
/// after TLS, from any number of addresses.
pub const CONNECTIONS_PER_ORGANISATION_MAX: usize = 256;
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// From the first byte of an HTTP/1.1 request head (or the end of the last
/// answer on a kept-alive connection) to the end of the head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight and no byte moved either way for
/// this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection this old is closed once its requests in flight are
/// answered (HTTP/2 GOAWAY; HTTP/1.1 `connection: close`), so no client holds
/// one connection, or one node, for ever.
pub const CONNECTION_AGE_MAX: Duration = Duration::from_secs(600);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const _: () = assert!(HANDSHAKES_PER_ADDRESS_MAX <= CONNECTIONS_PER_ADDRESS_MAX);
const _: () = assert!(CONNECTIONS_PER_ADDRESS_MAX < CONNECTIONS_MAX);
const _: () = assert!(CONNECTIONS_PER_ORGANISATION_MAX < CONNECTIONS_MAX);
const _: () = assert!(CONNECTION_AGE_MAX.as_millis() > REQUEST_TIMEOUT.as_millis());

#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub body_bytes_max: usize,
    /// Entries in one batch Bundle (the bulk-load path); each is a create.
    pub bundle_entries_max: usize,
    pub json_depth_max: usize,
    pub header_bytes_max: usize,
    pub page_size_default: usize,
    pub page_size_max: usize,
    /// Index entries one page of a search looks at, at most: a filter that
    /// skips most of a patient's pointers gives a shorter page with a `next`
    /// link instead of unbounded work (`total` is exact regardless).
    pub search_scan_max: usize,
    pub connections_max: usize,
    pub connections_per_address_max: usize,
    pub handshakes_per_address_max: usize,
    pub connections_per_organisation_max: usize,
    pub request_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub connection_age_max: Duration,
    /// Requests per second each client organisation may make, sustained.
    pub rate_per_client_per_sec: u32,
    /// Requests a client may make in a burst above the sustained rate.
    pub rate_burst: u32,
    /// Break-glass uses each organisation may make on this node in any
    /// hour (`break_glass.rs`).
    pub break_glass_per_org_per_hour: u32,
    /// How long a paging token may be used after its first page.
    pub cursor_ttl: Duration,
    pub request_id_len_max: usize,
    /// Most audit events each node returns for one "who looked" query.
    pub audit_query_events_max: u32,
    /// How long a "who looked" query waits for each other node.
    pub audit_fanout_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            body_bytes_max: 1 << 20,
            bundle_entries_max: 1_000,
            json_depth_max: 64,
            header_bytes_max: 16 << 10,
            page_size_default: 20,
            page_size_max: 100,
            search_scan_max: 10_000,
            connections_max: CONNECTIONS_MAX,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_MAX,
            handshakes_per_address_max: HANDSHAKES_PER_ADDRESS_MAX,
            connections_per_organisation_max: CONNECTIONS_PER_ORGANISATION_MAX,
            request_timeout: REQUEST_TIMEOUT,
            tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            connection_age_max: CONNECTION_AGE_MAX,
            rate_per_client_per_sec: 2000,
            rate_burst: 4000,
            break_glass_per_org_per_hour: crate::break_glass::BREAK_GLASS_PER_ORG_PER_HOUR,
            cursor_ttl: Duration::from_secs(600),
            request_id_len_max: 200,
            audit_query_events_max: 1_000,
            audit_fanout_timeout: Duration::from_secs(2),
        }
    }
}

/// A token bucket per client organisation.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<OdsCode, (f64, Instant)>>,
}

/// Organisations tracked by the limiter before idle ones are forgotten.
const RATE_LIMITER_CLIENTS_MAX: usize = 100_000;

impl RateLimiter {
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True if the client may make one more request now.
    pub fn allow(&self, client: &OdsCode) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= RATE_LIMITER_CLIENTS_MAX {
            let burst = self.burst;
            let rate = self.rate;
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(client.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

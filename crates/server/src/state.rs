//! The state of the server's own routes (`/metrics`, `/metrics/live`): the platform's handles plus the
//! Prometheus handle, which only the server needs.

use cascade_http::AppState;
use cascade_realtime::Realtime;

use crate::http::live::Live;
use crate::http::metrics::Metrics;

#[derive(Clone)]
pub struct ServerState {
    pub app: AppState,
    /// The Prometheus recorder's handle, for `GET /metrics`.
    pub metrics: Metrics,
    /// The dashboard's samples, for `GET /metrics/live`.
    pub live: Live,
    /// Real-time channels: `realtime.publish(channel, payload)` for server-side messages.
    pub realtime: Realtime,
}

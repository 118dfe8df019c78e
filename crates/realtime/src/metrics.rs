//! Recording of the `cascade_ws_*` series (names and help texts in `cascade_core::metrics`).

use cascade_core::metrics::{WS_CLOSES, WS_DROPPED, WS_MESSAGES, WS_QUEUE_DEPTH, WS_REJECTED};
use metrics::{counter, gauge};

pub fn queued(n: usize) {
    gauge!(WS_QUEUE_DEPTH).increment(n as f64);
}

pub fn dequeued(n: usize) {
    gauge!(WS_QUEUE_DEPTH).decrement(n as f64);
}

pub fn dropped(reason: &'static str) {
    counter!(WS_DROPPED, "reason" => reason).increment(1);
}

pub fn closed(reason: &'static str) {
    counter!(WS_CLOSES, "reason" => reason).increment(1);
}

pub fn rejected(reason: &'static str) {
    counter!(WS_REJECTED, "reason" => reason).increment(1);
}

pub fn received() {
    counter!(WS_MESSAGES, "direction" => "in").increment(1);
}

pub fn sent(n: usize) {
    counter!(WS_MESSAGES, "direction" => "out").increment(n as u64);
}

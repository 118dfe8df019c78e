//! Recording of the `cascade_ws_*` series (names and help texts in `cascade_core::metrics`).

use cascade_core::metrics::{WS_CLOSES, WS_DROPPED, WS_MESSAGES, WS_QUEUE_DEPTH, WS_REJECTED};
use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge};

// The series recorded per message or per write keep their handles: the macros look the
// series up in the recorder's registry (a hash of the name and labels) at every call.
static QUEUE_DEPTH: OnceLock<Gauge> = OnceLock::new();
static SENT: OnceLock<Counter> = OnceLock::new();

pub fn queued(n: usize) {
    if n > 0 {
        QUEUE_DEPTH
            .get_or_init(|| gauge!(WS_QUEUE_DEPTH))
            .increment(n as f64);
    }
}

pub fn dequeued(n: usize) {
    if n > 0 {
        QUEUE_DEPTH
            .get_or_init(|| gauge!(WS_QUEUE_DEPTH))
            .decrement(n as f64);
    }
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
    SENT.get_or_init(|| counter!(WS_MESSAGES, "direction" => "out"))
        .increment(n as u64);
}

//! What a session writes next, in order: answers and control frames, and `message`s as the
//! store encoded them.
//!
//! Why messages are kept apart from frames until the write: a client that opted in to
//! batches (`GET /ws?batch=1`) gets the messages that queued together as one text frame,
//! `{"type":"batch","messages":[…]}`, each element exactly the `message` object it would have
//! received on its own, in order. Fewer frames per delivery is fewer system calls, WebSocket
//! headers and client wake-ups on both sides (README, "Real time (issue 17)": at saturation the
//! kernel's per-frame work and the clients' dominate). Only consecutive messages are put
//! together (an `ack` or a `gap` between two keeps its place), a lone message stays a plain
//! `message`, and a batch frame holds at most the batch limit (hello's `max_message_bytes`)
//! of bytes, so a client sized for the largest message takes every batch; a message that does
//! not fit starts the next frame.

use bytes::{Bytes, BytesMut};
use yawc::Frame;

const BATCH_HEAD: &[u8] = br#"{"type":"batch","messages":["#;
const BATCH_TAIL: &[u8] = b"]}";

enum Item {
    Frame(Frame),
    /// A `message` object, encoded once per publish and shared by every subscriber.
    Message(Bytes),
}

/// The frames and messages a session has yet to write.
#[derive(Default)]
pub(crate) struct Outbox {
    items: Vec<Item>,
}

impl Outbox {
    pub fn push(&mut self, frame: Frame) {
        self.items.push(Item::Frame(frame));
    }

    /// A text frame of `text`.
    pub fn text(&mut self, text: impl Into<Bytes>) {
        self.push(Frame::text(text));
    }

    /// A `message` (as [`protocol::message`](crate::protocol::message) encoded it).
    pub fn message(&mut self, message: Bytes) {
        self.items.push(Item::Message(message));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// Forgets what is queued and gives back the memory beyond `keep` items.
    pub fn reset(&mut self, keep: usize) {
        self.items.clear();
        self.items.shrink_to(keep);
    }

    pub fn append(&mut self, other: &mut Outbox) {
        self.items.append(&mut other.items);
    }

    /// The frame at `*at` (moving `*at` past what it holds), `None` past the end. With
    /// `batch: Some(limit)`, consecutive messages become batch frames of at most `limit`
    /// bytes. The items stay until the caller [`clear`](Self::clear)s them once written.
    pub fn frame_at(&self, at: &mut usize, batch: Option<usize>) -> Option<Frame> {
        let first = self.items.get(*at)?;
        *at += 1;
        let message = match first {
            Item::Frame(frame) => return Some(frame.clone()),
            Item::Message(message) => message,
        };
        let Some(limit) = batch else {
            return Some(Frame::text(message.clone()));
        };
        // How many of the messages that follow fit with it.
        let mut size = BATCH_HEAD.len() + message.len() + BATCH_TAIL.len();
        let mut end = *at;
        while let Some(Item::Message(next)) = self.items.get(end) {
            if size + 1 + next.len() > limit {
                break;
            }
            size += 1 + next.len();
            end += 1;
        }
        if end == *at {
            return Some(Frame::text(message.clone()));
        }
        let mut body = BytesMut::with_capacity(size);
        body.extend_from_slice(BATCH_HEAD);
        body.extend_from_slice(message);
        for item in &self.items[*at..end] {
            if let Item::Message(next) = item {
                body.extend_from_slice(b",");
                body.extend_from_slice(next);
            }
        }
        body.extend_from_slice(BATCH_TAIL);
        *at = end;
        Some(Frame::text(body.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn message(n: usize, pad: usize) -> Bytes {
        Bytes::from(crate::protocol::message(
            "c",
            "e",
            n as u64,
            0,
            &format!("{{\"pad\":\"{}\"}}", "x".repeat(pad)),
        ))
    }

    fn frames(outbox: &Outbox, batch: Option<usize>) -> Vec<Value> {
        let mut at = 0;
        std::iter::from_fn(|| outbox.frame_at(&mut at, batch))
            .map(|frame| serde_json::from_slice(frame.payload()).unwrap())
            .collect()
    }

    #[test]
    fn consecutive_messages_become_one_batch_and_other_frames_keep_their_place() {
        let mut outbox = Outbox::default();
        outbox.text(r#"{"type":"ack"}"#);
        for n in 1..=3 {
            outbox.message(message(n, 0));
        }
        outbox.text(r#"{"type":"gap"}"#);
        outbox.message(message(4, 0));
        let got = frames(&outbox, Some(65_536));
        let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ack", "batch", "gap", "message"]);
        let offsets: Vec<u64> = got[1]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [1, 2, 3]);
        assert_eq!(got[3]["offset"], 4);
        // Without batching: one frame per message, as encoded.
        let plain = frames(&outbox, None);
        assert_eq!(plain.len(), 6);
        assert!(plain.iter().all(|v| v["type"] != "batch"));
    }

    /// Messages of exactly `size` bytes each.
    fn sized(count: usize, size: usize) -> Outbox {
        let mut outbox = Outbox::default();
        for n in 1..=count {
            let bare = message(n, 0).len();
            let sized = message(n, size - bare);
            assert_eq!(sized.len(), size);
            outbox.message(sized);
        }
        outbox
    }

    /// The messages per frame and the bytes of each frame.
    fn shape(outbox: &Outbox, limit: usize) -> Vec<(usize, usize)> {
        let mut at = 0;
        std::iter::from_fn(|| outbox.frame_at(&mut at, Some(limit)))
            .map(|frame| {
                let value: Value = serde_json::from_slice(frame.payload()).unwrap();
                let n = value["messages"].as_array().map_or(1, Vec::len);
                (n, frame.payload().len())
            })
            .collect()
    }

    #[test]
    fn messages_that_fill_the_limit_to_the_byte_share_a_frame_and_one_byte_more_does_not() {
        // A batch of k messages of s bytes: the 28-byte head, the 2-byte tail, k - 1 commas.
        let wrapper = BATCH_HEAD.len() + BATCH_TAIL.len();
        assert_eq!(wrapper, 30);
        let (limit, size) = (2_029, 499);
        assert_eq!(wrapper + 4 * size + 3, limit);
        // To the exact byte: four a frame, each frame the limit exactly.
        assert_eq!(shape(&sized(12, size), limit), [(4, limit); 3]);
        // One byte more per message (the four would be 4 bytes over): three a frame.
        let three = wrapper + 3 * (size + 1) + 2;
        assert_eq!(shape(&sized(12, size + 1), limit), [(3, three); 4]);
        // Two messages that fill the limit with the wrapper, then one byte less of limit:
        // a size that forgot the wrapper would still put them together.
        let pair = (limit - wrapper - 1) / 2;
        assert_eq!(wrapper + 2 * pair + 1, limit);
        assert_eq!(shape(&sized(2, pair), limit), [(2, limit)]);
        assert_eq!(shape(&sized(2, pair), limit - 1), [(1, pair), (1, pair)]);
    }

    #[test]
    fn a_batch_never_passes_the_limit_and_a_message_too_big_for_one_goes_alone() {
        let mut outbox = Outbox::default();
        for n in 1..=20 {
            outbox.message(message(n, 200));
        }
        outbox.message(message(21, 2_000));
        outbox.message(message(22, 200));
        let limit = 1_024;
        let mut at = 0;
        let mut offsets = Vec::new();
        while let Some(frame) = outbox.frame_at(&mut at, Some(limit)) {
            let value: Value = serde_json::from_slice(frame.payload()).unwrap();
            if value["type"] == "batch" {
                assert!(frame.payload().len() <= limit, "{}", frame.payload().len());
                let messages = value["messages"].as_array().unwrap();
                assert!(messages.len() >= 2);
                offsets.extend(messages.iter().map(|m| m["offset"].as_u64().unwrap()));
            } else {
                offsets.push(value["offset"].as_u64().unwrap());
            }
        }
        assert_eq!(offsets, (1..=22).collect::<Vec<u64>>());
    }
}

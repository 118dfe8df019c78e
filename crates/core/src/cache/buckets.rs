//! The cache's key layout on a Redis Cluster: [`BUCKETS`] hash tags, spread over the slots.
//!
//! A Lua script may only touch keys of one slot. The cache's scripts touch a value, its lease
//! and the tag sets that index it, and a tag indexes keys of many namespaces: no tag per
//! namespace or per tag can hold all of a script's keys. So each value key falls in one of
//! [`BUCKETS`] buckets (a hash of the key), and everything a script touches for it carries the
//! bucket's hash tag: the value `P{b}ns:key`, its lease `Please:P{b}ns:key` (Redis hashes the
//! first `{…}`), the tag sets of that bucket `P{b}tag:T`, their draining sets and registries.
//! A key's lookup, lease, fill and invalidation stay one script on one master; a tag or
//! namespace invalidation runs once per bucket (the scripts sent concurrently).
//!
//! The buckets' tags are chosen so their slots are evenly spaced, one in the middle of each
//! sixteenth of the 16384 slots (slot 512 + 1024 i): any split of the slot range into equal
//! contiguous shares (what `redis-cli --cluster create` makes) gives each master its share of
//! buckets, ±1. Small numeric tags would not (`{0}`…`{31}` collide in CRC16 and leave shards
//! idle, centrifugal/centrifuge issue 554).
//!
//! 16 buckets: a namespace invalidation costs 16 short scripts (in parallel, spread over the
//! masters), and up to 16 masters share the cache's load. The layout is part of the stored
//! format: every instance of a deployment must use the same (`BUCKETS` and the choice of tag
//! strings are fixed).

/// How many buckets the cache's keys are spread over on a Redis Cluster.
pub const BUCKETS: usize = 16;

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16384;

/// Bucket `i`'s hash tag: the smallest number whose slot is 512 + 1024 `i` (found once by
/// search; the tests below check them). Part of the stored layout: never change them.
const TAGS: [&str; BUCKETS] = [
    "{1768}", "{20261}", "{18360}", "{41271}", "{3453}", "{11199}", "{29098}", "{8591}", "{265}",
    "{45842}", "{13409}", "{17891}", "{46093}", "{3635}", "{2912}", "{48623}",
];

/// The buckets' hash tags, `{…}` included, and which bucket a key falls in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buckets;

impl Buckets {
    pub fn new() -> Buckets {
        Buckets
    }

    /// The bucket of a value key (its full name, without the prefix): FNV-1a, stable across
    /// versions and machines.
    pub fn of(&self, full_key: &str) -> usize {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in full_key.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % BUCKETS as u64) as usize
    }

    /// Bucket `bucket`'s hash tag, braces included.
    pub fn tag(&self, bucket: usize) -> &'static str {
        TAGS[bucket]
    }

    /// Every bucket's hash tag.
    pub fn tags(&self) -> &'static [&'static str] {
        &TAGS
    }
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster takes modulo 16384 for a key's slot.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`, by Redis Cluster's rule: the CRC16 of its hash tag (what is between the
/// first `{` and the next `}`, if not empty), else of the whole key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_and_hash_tags_follow_redis_cluster() {
        // Redis Cluster's specification: CRC16 of "123456789" is 0x31C3.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo{bar}baz"), slot(b"bar"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
    }

    #[test]
    fn bucket_tags_are_evenly_spaced_over_the_slots() {
        let buckets = Buckets::new();
        let share = SLOTS / BUCKETS as u16;
        for (i, tag) in buckets.tags().iter().enumerate() {
            let number = &tag[1..tag.len() - 1];
            assert_eq!(
                slot(number.as_bytes()),
                i as u16 * share + share / 2,
                "{tag}"
            );
            // The smallest such number.
            let smallest = (0u32..)
                .find(|n| slot(n.to_string().as_bytes()) == slot(number.as_bytes()))
                .unwrap();
            assert_eq!(smallest.to_string(), number);
        }
        // An even split of the slots over 3 to 16 masters gives each master its share of
        // buckets, ±1.
        for masters in 3..=16u32 {
            let mut counts = vec![0u32; masters as usize];
            for tag in buckets.tags() {
                let slot = u32::from(slot(tag.as_bytes()));
                // redis-cli's split: master m serves [m * 16384 / n, (m + 1) * 16384 / n).
                let m = (0..masters)
                    .find(|&m| slot < (m + 1) * u32::from(SLOTS) / masters)
                    .unwrap();
                counts[m as usize] += 1;
            }
            let (low, high) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(high - low <= 1, "{masters} masters: {counts:?}");
        }
    }

    #[test]
    fn keys_spread_over_every_bucket() {
        let buckets = Buckets::new();
        let mut counts = [0u32; BUCKETS];
        for i in 0..16_000 {
            counts[buckets.of(&format!("assets:{i}"))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}

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

/// Bucket `i`'s hash tag: `spread_tag(i, BUCKETS)`, the smallest number whose slot is
/// 512 + 1024 `i` (found once by search; the tests below check them). Part of the stored
/// layout: never change them.
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

/// The hash tag (braces included) of part `i` of `n` spread evenly over a cluster's slots:
/// the smallest number whose slot is the middle of the `i`-th of `n` equal shares of the slot
/// range. Any split of the slots into equal contiguous shares (what `redis-cli --cluster
/// create` makes) then gives each master its share of the parts, ±1; consecutive small
/// numbers would not (`{0}`…`{31}` collide). The cache's buckets use it (`n` = [`BUCKETS`]),
/// and so do the real-time fan-out's shard channels.
pub fn spread_tag(i: usize, n: usize) -> String {
    let n = n.max(1) as u64;
    let target = ((i as u64 % n) * u64::from(SLOTS) + u64::from(SLOTS) / 2) / n;
    // Every slot is reached by a number below 10^6 (the tests check the parts of up to 64);
    // the fallback keeps the function total.
    let number = (0u32..1_000_000)
        .find(|k| u64::from(slot(k.to_string().as_bytes())) == target)
        .unwrap_or(i as u32);
    format!("{{{number}}}")
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
            assert_eq!(slot(tag.as_bytes()), i as u16 * share + share / 2, "{tag}");
            assert_eq!(*tag, spread_tag(i, BUCKETS));
        }
        assert_even_over_masters(buckets.tags(), 3..=16);
    }

    /// The master serving `tag` when `masters` split the slots as redis-cli does: master m
    /// serves [m * 16384 / n, (m + 1) * 16384 / n).
    fn master_of(tag: &str, masters: u32) -> u32 {
        let slot = u32::from(slot(tag.as_bytes()));
        (0..masters)
            .find(|&m| slot < (m + 1) * u32::from(SLOTS) / masters)
            .unwrap()
    }

    /// Each master gets its share of `tags`, ±1.
    fn assert_even_over_masters(tags: &[impl AsRef<str>], masters: std::ops::RangeInclusive<u32>) {
        for masters in masters {
            let mut counts = vec![0u32; masters as usize];
            for tag in tags {
                counts[master_of(tag.as_ref(), masters) as usize] += 1;
            }
            let (low, high) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(high - low <= 1, "{masters} masters: {counts:?}");
        }
    }

    #[test]
    fn spread_tags_put_part_i_of_n_in_slot_share_i() {
        for n in (1..=16usize).chain([31, 64]) {
            let tags: Vec<String> = (0..n).map(|i| spread_tag(i, n)).collect();
            for (i, tag) in tags.iter().enumerate() {
                let slot = usize::from(slot(tag.as_bytes()));
                let share = i * usize::from(SLOTS) / n..(i + 1) * usize::from(SLOTS) / n;
                assert!(
                    share.contains(&slot),
                    "part {i} of {n}: {tag} in slot {slot}"
                );
                // Found by search, not the fallback.
                let number: u32 = tag[1..tag.len() - 1].parse().unwrap();
                assert_eq!(
                    u64::from(slot as u16),
                    (i as u64 * 16384 + 8192) / n as u64,
                    "{tag} ({number})"
                );
            }
            if n >= 3 {
                assert_even_over_masters(&tags, 3..=(n as u32).min(16));
            }
        }
        // What this avoids: `{0}`, `{1}`, `{2}` (slots 13907, 9842, 5649) leave one master of
        // 3 idle; the spread tags use all three.
        let masters = |tags: &[String]| -> std::collections::HashSet<u32> {
            tags.iter().map(|t| master_of(t, 3)).collect()
        };
        let naive: Vec<String> = (0..3).map(|i| format!("{{{i}}}")).collect();
        let spread: Vec<String> = (0..3).map(|i| spread_tag(i, 3)).collect();
        assert_eq!(masters(&naive).len(), 2, "{naive:?}");
        assert_eq!(masters(&spread).len(), 3, "{spread:?}");
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

//! A bounded per-client table of limiters: sharded, least-recently-used, idle-only eviction.
//!
//! # Semantics
//!
//! Each [`ClientKey`] gets its own limiter, a [fresh](Limiter::fresh) copy of the template, on
//! its first request. The table holds at most `max_keys` of them and never grows past that:
//!
//! - A key that is present is always served by its own limiter.
//! - A new key is inserted if its shard has room. Otherwise the shard's least recently used
//!   *idle* key is evicted to make room: idle means back to the initial state (a full token
//!   bucket, an empty window), so dropping it and later re-creating it gives nobody extra quota.
//!   Only the 32 least recently used keys of the shard are looked at, so the work under the
//!   shard lock stays bounded.
//! - If none of them is idle, the table is full of clients that are actively limited, and the
//!   newcomer is served by one shared **overflow** limiter with the same policy, without being
//!   inserted: a flood of new keys gets, all together, what one client would get; it cannot
//!   grow memory, and it cannot push out an active client to hand it a fresh bucket. A key served
//!   from overflow gets its own fresh limiter once there is room (what it took from the overflow
//!   limiter is not carried over, so it can get at most one extra burst that way).
//! - [`KeyedLimiter::sweep`], called periodically, removes every idle key.
//!
//! # Sharding
//!
//! Keys are spread over up to 64 shards (fewer for tables under 4,096 keys) by a randomly keyed
//! SipHash (std's `RandomState`, as the keys come from clients and must not be able to pick
//! their shard or collide on purpose). Each shard is a `Mutex` around a hash map and an LRU
//! list, with a fixed share of `max_keys`, so the bound is exact and no lock is global. Recency
//! and eviction are per shard: the evicted key is the least recently used idle key of the
//! newcomer's shard. With random hashing shards fill evenly, but a shard can fill up a little
//! before the table does, so size `max_keys` with some headroom over the number of clients
//! expected to be active at once.
//!
//! The per-key limiter is consulted under the shard lock, so an eviction can never race with a
//! request on the evicted key (which would otherwise count on a limiter that is being dropped).
//!
//! # Memory
//!
//! Per key: the limiter (about 64 bytes for a token bucket; a sliding window adds 8 bytes per
//! admission in its window), the key (header keys are capped at [`MAX_HEADER_KEY_BYTES`] by
//! [`ClientKey::header`]) and roughly 100 bytes of bookkeeping (map entry, LRU links, `Arc`).

use crate::sync::lock;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::{Decision, Limiter, Quota, RateLimitError};

/// Header values longer than this are stored as their SHA-256 digest (see [`ClientKey::header`]).
pub const MAX_HEADER_KEY_BYTES: usize = 64;

/// The most shards a table is split into.
const MAX_SHARDS: usize = 64;
/// Fewer shards for small tables, so that every shard has a useful share of `max_keys`.
const MIN_KEYS_PER_SHARD: usize = 64;
/// How many of a shard's least recently used keys a newcomer looks at for an idle one.
const EVICTION_SCAN: usize = 32;
/// "No node" in the LRU list.
const NIL: usize = usize::MAX;
/// Marks a header key stored as a digest; with the hex digest it is longer than any raw key.
const DIGEST_PREFIX: &[u8] = b"sha256:";

/// Who a per-client limit applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientKey {
    /// The client's address. IPv6 addresses should be truncated to a prefix (a client usually
    /// owns a whole /64): [`ClientKey::ip`] does that.
    Ip(IpAddr),
    /// The value of a configured request header (e.g. an API key). [`ClientKey::header`] bounds
    /// its size.
    Header(Box<[u8]>),
}

/// One limiter per client key, bounded to `max_keys` keys; see the
/// [module documentation](self). `Send + Sync`, meant to be shared through an `Arc`.
pub struct KeyedLimiter<L> {
    /// The policy; never consulted itself, only copied by [`Limiter::fresh`].
    template: L,
    overflow: L,
    shards: Box<[Mutex<Shard<L>>]>,
    /// Picks the shard; independent of the maps' own hashers, so keys that share a shard still
    /// spread over their map's buckets.
    shard_hasher: RandomState,
    max_keys: usize,
    len: AtomicUsize,
    evictions: AtomicU64,
    overflowed: AtomicU64,
}

/// A share of the table: a map from key to node and a doubly linked LRU list over the nodes.
struct Shard<L> {
    index: HashMap<Arc<ClientKey>, usize>,
    /// Dense: a removed node's slot is filled by the last node.
    nodes: Vec<Node<L>>,
    /// Most recently used.
    head: usize,
    /// Least recently used.
    tail: usize,
    capacity: usize,
}

struct Node<L> {
    key: Arc<ClientKey>,
    limiter: L,
    /// Towards the head (more recent).
    prev: usize,
    /// Towards the tail (less recent).
    next: usize,
}

impl Hash for ClientKey {
    /// One write per key: with SipHash every `write` call costs as much as the bytes it adds,
    /// and the derived impl makes five for an address (two discriminants, a length, the bytes).
    /// Keys of different kinds may hash alike (a 4-byte header and an IPv4 address); equality
    /// still tells them apart, and the random SipHash key keeps any such pair unpredictable.
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            ClientKey::Ip(IpAddr::V4(v4)) => state.write_u32(u32::from(*v4)),
            ClientKey::Ip(IpAddr::V6(v6)) => state.write_u128(u128::from(*v6)),
            ClientKey::Header(bytes) => state.write(bytes),
        }
    }
}

impl ClientKey {
    /// The key for a client address: IPv4 as is, IPv6 truncated to its first `ipv6_prefix_len`
    /// bits (at most 128; 64 is the usual choice). An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// what a dual-stack socket reports for IPv4 clients) is keyed as the IPv4 address, so
    /// truncation never lumps all IPv4 clients together.
    pub fn ip(addr: IpAddr, ipv6_prefix_len: u8) -> Self {
        match addr.to_canonical() {
            IpAddr::V4(v4) => ClientKey::Ip(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u32::from(ipv6_prefix_len.min(128));
                // A /0 prefix would shift by 128, which `checked_shl` turns into an empty mask.
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                ClientKey::Ip(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)))
            }
        }
    }

    /// The key for a header value. Values of up to [`MAX_HEADER_KEY_BYTES`] are kept as they
    /// are; longer ones are replaced by `sha256:` and their hex SHA-256 digest (71 bytes, so it
    /// can equal no kept value), bounding the table's memory whatever clients send.
    pub fn header(value: &[u8]) -> Self {
        if value.len() <= MAX_HEADER_KEY_BYTES {
            return ClientKey::Header(value.into());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, value);
        let mut key = Vec::with_capacity(DIGEST_PREFIX.len() + 2 * digest.as_ref().len());
        key.extend_from_slice(DIGEST_PREFIX);
        for byte in digest.as_ref() {
            key.push(hex_digit(byte >> 4));
            key.push(hex_digit(byte & 0xf));
        }
        ClientKey::Header(key.into_boxed_slice())
    }
}

impl<L: Limiter> KeyedLimiter<L> {
    /// A table of at most `max_keys` (at least 1) per-client copies of `template`, plus the
    /// overflow limiter, also a copy of it.
    pub fn try_new(template: L, max_keys: usize) -> Result<Self, RateLimitError> {
        if max_keys == 0 {
            return Err(RateLimitError::ZeroMaxKeys);
        }
        let shard_count = (max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS);
        let shards = (0..shard_count)
            .map(|i| {
                // The first `max_keys % shard_count` shards take one extra key, so the shares
                // add up to exactly `max_keys`.
                let capacity = max_keys / shard_count + usize::from(i < max_keys % shard_count);
                Mutex::new(Shard::new(capacity))
            })
            .collect();
        Ok(Self {
            overflow: template.fresh(Instant::now()),
            template,
            shards,
            shard_hasher: RandomState::new(),
            max_keys,
            len: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        })
    }

    /// Decides one request from `key` at `now`: by the key's own limiter, created on first use
    /// (evicting an idle key if the shard is full), or by the overflow limiter when the shard is
    /// full of active keys.
    pub fn try_acquire(&self, key: &ClientKey, now: Instant) -> Decision {
        let mut shard = self.shard(key);
        if let Some(&i) = shard.index.get(key) {
            shard.touch(i);
            return shard.nodes[i].limiter.try_acquire(now);
        }
        if shard.nodes.len() >= shard.capacity {
            let Some(victim) = shard.idle_victim(now) else {
                drop(shard);
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                return self.overflow.try_acquire(now);
            };
            shard.remove(victim);
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let limiter = self.template.fresh(now);
        let decision = limiter.try_acquire(now);
        shard.insert(Arc::new(key.clone()), limiter);
        self.len.fetch_add(1, Ordering::Relaxed);
        decision
    }

    /// Removes every key that is idle at `now`, one shard at a time, and returns how many. Meant
    /// to run periodically, so that memory follows the active clients.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut total = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let mut removed = 0;
            // Backwards, because `remove` refills the slot with the last node, already seen.
            for i in (0..shard.nodes.len()).rev() {
                if shard.nodes[i].limiter.is_idle(now) {
                    shard.remove(i);
                    removed += 1;
                }
            }
            self.len.fetch_sub(removed, Ordering::Relaxed);
            total += removed;
        }
        self.evictions.fetch_add(total as u64, Ordering::Relaxed);
        total
    }

    /// Keys currently in the table; never more than [`max_keys`](Self::max_keys).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the table holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table's bound.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Keys removed so far, to make room for a new key or by [`sweep`](Self::sweep); all of them
    /// were idle.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Requests so far that found no room and were decided by the overflow limiter.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// The per-client policy (shared by the overflow limiter).
    pub fn quota(&self) -> Quota {
        self.template.quota()
    }

    fn shard(&self, key: &ClientKey) -> MutexGuard<'_, Shard<L>> {
        let hash = self.shard_hasher.hash_one(key);
        // The remainder is below the shard count, a usize.
        let i = (hash % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }
}

impl<L> fmt::Debug for KeyedLimiter<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("shards", &self.shards.len())
            .field("max_keys", &self.max_keys)
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("evictions", &self.evictions.load(Ordering::Relaxed))
            .field("overflowed", &self.overflowed.load(Ordering::Relaxed))
            .finish()
    }
}

impl<L: Limiter> Shard<L> {
    fn new(capacity: usize) -> Self {
        Self {
            index: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    /// The least recently used idle node among the last [`EVICTION_SCAN`], if any.
    fn idle_victim(&self, now: Instant) -> Option<usize> {
        let mut i = self.tail;
        for _ in 0..EVICTION_SCAN {
            if i == NIL {
                return None;
            }
            if self.nodes[i].limiter.is_idle(now) {
                return Some(i);
            }
            i = self.nodes[i].prev;
        }
        None
    }
}

impl<L> Shard<L> {
    fn insert(&mut self, key: Arc<ClientKey>, limiter: L) {
        let i = self.nodes.len();
        self.nodes.push(Node {
            key: key.clone(),
            limiter,
            prev: NIL,
            next: NIL,
        });
        self.index.insert(key, i);
        self.push_front(i);
    }

    fn remove(&mut self, i: usize) {
        self.unlink(i);
        let removed = self.nodes.swap_remove(i);
        self.index.remove(&*removed.key);
        if i < self.nodes.len() {
            // The former last node now lives at `i`: repoint its neighbours and its map entry.
            let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
            if prev == NIL {
                self.head = i;
            } else {
                self.nodes[prev].next = i;
            }
            if next == NIL {
                self.tail = i;
            } else {
                self.nodes[next].prev = i;
            }
            if let Some(slot) = self.index.get_mut(&*self.nodes[i].key) {
                *slot = i;
            }
        }
    }

    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        if self.head == NIL {
            self.tail = i;
        } else {
            self.nodes[self.head].prev = i;
        }
        self.head = i;
    }
}

fn hex_digit(nibble: u8) -> u8 {
    b"0123456789abcdef"[usize::from(nibble & 0xf)]
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use tokio::time::advance;

    use super::*;
    use crate::ratelimit::{SlidingWindow, TokenBucket};

    /// 5 r/s, burst 10: one request keeps a fresh key busy (not idle) for 200 ms.
    fn table(max_keys: usize) -> KeyedLimiter<TokenBucket> {
        let bucket = TokenBucket::try_new(5.0, 10).expect("valid bucket");
        KeyedLimiter::try_new(bucket, max_keys).expect("valid table")
    }

    fn ip(n: u32) -> ClientKey {
        ClientKey::Ip(IpAddr::V4(Ipv4Addr::from(n)))
    }

    /// Requests until denied, returning how many were admitted.
    fn drain(table: &KeyedLimiter<TokenBucket>, key: &ClientKey, now: Instant) -> u32 {
        let mut admitted = 0;
        while admitted < 1_000 && table.try_acquire(key, now).is_allowed() {
            admitted += 1;
        }
        admitted
    }

    /// Checks the LRU list and the map of every shard against each other.
    fn assert_consistent<L: Limiter>(table: &KeyedLimiter<L>) {
        let mut total = 0;
        for shard in table.shards.iter() {
            let shard = lock(shard);
            assert!(shard.nodes.len() <= shard.capacity, "shard over capacity");
            assert_eq!(shard.index.len(), shard.nodes.len());
            let (mut i, mut prev, mut walked) = (shard.head, NIL, 0);
            while i != NIL {
                assert_eq!(shard.nodes[i].prev, prev, "broken back link");
                assert_eq!(shard.index.get(&*shard.nodes[i].key), Some(&i));
                (prev, i) = (i, shard.nodes[i].next);
                walked += 1;
            }
            assert_eq!(shard.tail, prev, "tail is the last node");
            assert_eq!(walked, shard.nodes.len(), "every node is on the list once");
            total += walked;
        }
        assert_eq!(table.len(), total, "len() counts the keys");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_limited_independently() {
        let table = table(100);
        let (a, b) = (ip(1), ClientKey::header(b"api-key-b"));
        let now = Instant::now();
        assert_eq!(drain(&table, &a, now), 10);
        assert_eq!(
            table.try_acquire(&a, now),
            Decision::Deny {
                retry_after: Duration::from_millis(200)
            }
        );
        assert_eq!(
            table.try_acquire(&b, now),
            Decision::Allow {
                remaining: 9,
                reset: Duration::from_millis(200)
            },
            "another key has its own full bucket"
        );
        assert_eq!(drain(&table, &b, now), 9);
        advance(Duration::from_millis(200)).await;
        assert!(table.try_acquire(&a, Instant::now()).is_allowed());
        assert_eq!(table.len(), 2);
        assert_eq!((table.evictions(), table.overflowed()), (0, 0));
        assert_consistent(&table);
    }

    #[tokio::test(start_paused = true)]
    async fn a_million_keys_stay_bounded_and_only_idle_keys_are_evicted() {
        const MAX_KEYS: usize = 10_000;
        const KEYS: u32 = 1_000_000;
        // 25 new keys per millisecond: each stays busy for 200 ms, so about 5,000 are busy at
        // any time, half the table; the rest of the table is idle and can be evicted.
        const KEYS_PER_MS: u32 = 25;
        let table = table(MAX_KEYS);
        let start = Instant::now();
        let active = ClientKey::header(b"active client");
        let mut active_admitted = drain(&table, &active, start);
        assert_eq!(
            active_admitted, 10,
            "the active client spends its burst first"
        );

        for n in 0..KEYS {
            if n % KEYS_PER_MS == 0 {
                advance(Duration::from_millis(1)).await;
            }
            let now = Instant::now();
            let decision = table.try_acquire(&ip(n), now);
            assert!(
                decision.is_allowed(),
                "key {n} is new and gets a full bucket"
            );
            assert!(
                table.len() <= MAX_KEYS,
                "len {} over the bound",
                table.len()
            );
            // Every 100 ms the active client spends whatever it has, so it is never idle: a
            // fresh bucket would show up as a burst of 10.
            if n % (100 * KEYS_PER_MS) == 0 {
                let admitted = drain(&table, &active, now);
                assert!(
                    admitted <= 1,
                    "the active client got {admitted} at {:?}: a fresh bucket",
                    now - start
                );
                active_admitted += admitted;
            }
        }
        let elapsed = Instant::now() - start;
        active_admitted += drain(&table, &active, Instant::now());
        let allowance = 10 + (elapsed.as_millis() / 200) as u32;
        assert_eq!(
            active_admitted, allowance,
            "over {elapsed:?} the active client gets exactly its burst plus 5/s"
        );
        assert_eq!(table.len(), MAX_KEYS, "the table is full, not more");
        assert_eq!(table.overflowed(), 0, "half the table was always idle");
        assert_eq!(
            table.evictions(),
            u64::from(KEYS) + 1 - MAX_KEYS as u64,
            "every key inserted and no longer present was evicted"
        );
        assert_consistent(&table);
    }

    #[tokio::test(start_paused = true)]
    async fn newcomers_share_the_overflow_limiter_when_no_key_is_idle() {
        // Below MIN_KEYS_PER_SHARD: a single shard, so "full" is deterministic.
        let table = table(50);
        let now = Instant::now();
        for n in 0..50 {
            assert!(table.try_acquire(&ip(n), now).is_allowed());
        }
        // Every key holds 9 of 10 tokens: none is idle, none may be evicted.
        for n in 50..70 {
            let decision = table.try_acquire(&ip(n), now);
            assert_eq!(
                decision.is_allowed(),
                n < 60,
                "newcomer {n}: the overflow limiter has one client's burst of 10 for all of them"
            );
        }
        assert_eq!(table.len(), 50);
        assert_eq!(table.overflowed(), 20);
        assert_eq!(table.evictions(), 0);
        for n in 0..50 {
            assert_eq!(
                table.try_acquire(&ip(n), now),
                Decision::Allow {
                    remaining: 8,
                    reset: Duration::from_millis(400)
                },
                "key {n} kept its own (used) bucket"
            );
        }

        // Once the keys are idle again, a newcomer evicts the least recently used of them.
        advance(Duration::from_millis(400)).await;
        let now = Instant::now();
        assert!(
            table.try_acquire(&ip(0), now).is_allowed(),
            "key 0 is used again"
        );
        assert_eq!(
            table.try_acquire(&ip(100), now),
            Decision::Allow {
                remaining: 9,
                reset: Duration::from_millis(200)
            }
        );
        assert_eq!((table.len(), table.evictions()), (50, 1));
        let shard = lock(&table.shards[0]);
        assert!(
            shard.index.contains_key(&ip(0)),
            "the recently used key stays"
        );
        assert!(
            !shard.index.contains_key(&ip(1)),
            "the least recently used idle key goes"
        );
        drop(shard);
        assert_consistent(&table);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_removes_idle_keys_only() {
        let table = table(10_000);
        let start = Instant::now();
        for n in 0..500 {
            table.try_acquire(&ip(n), start);
        }
        let busy = ip(7);
        assert_eq!(drain(&table, &busy, start), 9, "key 7 spends its bucket");
        assert_eq!(table.sweep(start), 0, "nothing is idle yet");

        advance(Duration::from_millis(200)).await;
        assert_eq!(
            table.sweep(Instant::now()),
            499,
            "all but the busy key are idle"
        );
        assert_eq!(table.len(), 1);
        assert_eq!(table.evictions(), 499);
        assert_consistent(&table);
        assert_eq!(
            drain(&table, &busy, Instant::now()),
            1,
            "the busy key kept its bucket: one token refilled, not a fresh burst"
        );

        advance(Duration::from_secs(2)).await;
        assert_eq!(table.sweep(Instant::now()), 1);
        assert!(table.is_empty());
        assert_consistent(&table);
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_sliding_windows() {
        let window = SlidingWindow::try_new(2, Duration::from_secs(1)).expect("valid window");
        let table = KeyedLimiter::try_new(window, 10).expect("valid table");
        let key = ClientKey::header(b"k");
        let now = Instant::now();
        assert!(table.try_acquire(&key, now).is_allowed());
        assert!(table.try_acquire(&key, now).is_allowed());
        assert!(!table.try_acquire(&key, now).is_allowed());
        assert_eq!(table.sweep(now), 0);
        advance(Duration::from_secs(1)).await;
        assert_eq!(
            table.sweep(Instant::now()),
            1,
            "idle once its window is empty"
        );
        assert_eq!(
            table.quota(),
            Quota {
                limit: 2,
                window: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn equal_keys_hash_equal_and_lookups_find_every_kind() {
        let hasher = RandomState::new();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let (a, b) = (ClientKey::ip(mapped, 64), ClientKey::ip(v4, 64));
        assert_eq!(a, b);
        assert_eq!(hasher.hash_one(&a), hasher.hash_one(&b));
        let v6 = ClientKey::ip("2001:db8::1".parse().unwrap(), 64);
        assert_eq!(
            hasher.hash_one(&v6),
            hasher.hash_one(ClientKey::ip("2001:db8::2".parse().unwrap(), 64)),
            "one /64, one key"
        );
        let header = ClientKey::header(b"api-key-1");
        let keys = [a, v6, header.clone(), ClientKey::header(b"api-key-2")];
        let map: HashMap<&ClientKey, usize> = keys.iter().zip(0..).collect();
        assert_eq!(map.len(), 4);
        assert_eq!(map[&header], 2);
        assert_eq!(map[&ClientKey::ip(v4, 64)], 0);
    }

    #[test]
    fn rejects_a_zero_bound_and_splits_the_bound_exactly() {
        let bucket = TokenBucket::try_new(1.0, 1).expect("valid bucket");
        assert_eq!(
            KeyedLimiter::try_new(bucket, 0).err(),
            Some(RateLimitError::ZeroMaxKeys)
        );
        for max_keys in [1, 63, 64, 1_000, 10_000, 123_457] {
            let table = table(max_keys);
            let capacities: Vec<usize> = table.shards.iter().map(|s| lock(s).capacity).collect();
            assert_eq!(capacities.iter().sum::<usize>(), max_keys);
            assert!(capacities.iter().all(|&c| c >= 1), "no shard without room");
            assert!(capacities.len() <= MAX_SHARDS);
        }
    }

    #[test]
    fn ip_keys_truncate_ipv6_and_unmap_ipv4() {
        let v6 = |s: &str| s.parse::<IpAddr>().expect("valid address");
        assert_eq!(
            ClientKey::ip(v6("2001:db8:1:2:3:4:5:6"), 64),
            ClientKey::Ip(v6("2001:db8:1:2::"))
        );
        assert_eq!(
            ClientKey::ip(v6("2001:db8:1:2:3:4:5:6"), 48),
            ClientKey::Ip(v6("2001:db8:1::"))
        );
        assert_eq!(
            ClientKey::ip(v6("2001:db8::1"), 200),
            ClientKey::Ip(v6("2001:db8::1")),
            "prefixes over 128 keep the whole address"
        );
        assert_eq!(ClientKey::ip(v6("2001:db8::1"), 0), ClientKey::Ip(v6("::")));
        assert_eq!(
            ClientKey::ip(v6("::ffff:192.0.2.7"), 64),
            ClientKey::Ip(v6("192.0.2.7")),
            "IPv4-mapped addresses are IPv4 clients, not one /64"
        );
        assert_eq!(
            ClientKey::ip(v6("192.0.2.7"), 0),
            ClientKey::Ip(v6("192.0.2.7"))
        );
    }

    #[test]
    fn header_keys_are_bounded() {
        let short = vec![b'k'; MAX_HEADER_KEY_BYTES];
        assert_eq!(
            ClientKey::header(&short),
            ClientKey::Header(short.clone().into())
        );
        let long = vec![b'k'; 64 * 1024];
        let ClientKey::Header(hashed) = ClientKey::header(&long) else {
            panic!("a header key stays a header key");
        };
        assert_eq!(hashed.len(), DIGEST_PREFIX.len() + 64);
        assert!(
            hashed.len() > MAX_HEADER_KEY_BYTES,
            "cannot equal a kept value"
        );
        assert!(hashed.starts_with(DIGEST_PREFIX));
        let mut other = long.clone();
        other[40_000] = b'j';
        assert_ne!(ClientKey::header(&other), ClientKey::header(&long));
        assert_eq!(ClientKey::header(&long), ClientKey::header(&long));
        // The digest is SHA-256 in lowercase hex: checked against `sha256sum` for 65 × "a".
        let ClientKey::Header(digest) = ClientKey::header(&[b'a'; 65]) else {
            panic!("a header key stays a header key");
        };
        assert_eq!(
            std::str::from_utf8(&digest).expect("ascii"),
            format!(
                "sha256:{}",
                "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0"
            )
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_requests_on_one_key_never_exceed_its_allowance() {
        const TASKS: usize = 64;
        const TRIES: usize = 200;
        const BURST: u32 = 100;
        let bucket = TokenBucket::try_new(0.001, BURST).expect("valid bucket");
        let table = Arc::new(KeyedLimiter::try_new(bucket, 1_000).expect("valid table"));
        let shared = ClientKey::header(b"shared");
        // Inserted first: later newcomers fill the table and are served by the overflow limiter,
        // but a present key keeps its own bucket.
        assert!(table.try_acquire(&shared, Instant::now()).is_allowed());
        let allowed = Arc::new(AtomicU32::new(1));
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (table, allowed, barrier) = (table.clone(), allowed.clone(), barrier.clone());
                let key = shared.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    for i in 0..TRIES {
                        if table.try_acquire(&key, Instant::now()).is_allowed() {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        // Other keys come and go in the same shards meanwhile.
                        table.try_acquire(&ip((t * TRIES + i) as u32), Instant::now());
                        if i % 16 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("acquiring task");
        }
        assert_eq!(
            allowed.load(Ordering::Relaxed),
            BURST,
            "{TASKS} tasks × {TRIES} tries on one key must admit exactly its burst"
        );
        assert_consistent(&table);
    }
}

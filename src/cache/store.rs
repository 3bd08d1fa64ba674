//! The bounded entry table: sharded by URL, least-recently-used eviction by entry count and
//! bytes within each shard.

use crate::sync::lock;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use http::HeaderMap;

use super::PrimaryKey;
use super::entry::CachedEntry;

/// The most shards a table is split into.
const MAX_SHARDS: u64 = 64;
/// Fewer shards for small tables, so that every shard has a useful share of `max_entries`.
const MIN_ENTRIES_PER_SHARD: u64 = 64;
/// At most this many variants of one URL are kept; a response varying on a field with many
/// values (say `User-Agent`) then recycles its own variants instead of flushing the shard.
pub(super) const MAX_VARIANTS: usize = 16;
/// "No node" in the LRU list.
const NIL: usize = usize::MAX;

/// See the [module documentation](self).
pub(super) struct Store {
    shards: Box<[Mutex<Shard>]>,
    shard_hasher: RandomState,
    pub(super) entries: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) evictions: AtomicU64,
}

/// A share of the table: URL → its variants' nodes, and an LRU list over all nodes.
struct Shard {
    /// Variants in insertion order (oldest first).
    index: HashMap<Arc<PrimaryKey>, Vec<usize>>,
    /// A slab: removed nodes leave a hole that `free` hands out again.
    nodes: Vec<Option<Node>>,
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used.
    tail: usize,
    len: u64,
    bytes: u64,
    max_entries: u64,
    max_bytes: u64,
}

struct Node {
    entry: Arc<CachedEntry>,
    /// Towards the head (more recent).
    prev: usize,
    /// Towards the tail (less recent).
    next: usize,
}

impl Store {
    /// `max_entries` and `max_bytes` are at least 1 and `max_object_bytes` at most `max_bytes`
    /// (checked by the caller). Shards are sized so each can hold two of the largest objects.
    pub(super) fn new(max_entries: u64, max_bytes: u64, max_object_bytes: u64) -> Self {
        let by_entries = max_entries / MIN_ENTRIES_PER_SHARD;
        let by_bytes = max_bytes / max_object_bytes.saturating_mul(2).max(1);
        let count = by_entries.min(by_bytes).clamp(1, MAX_SHARDS);
        let shards = (0..count)
            .map(|i| {
                // The first `max % count` shards take one more, so shares add up exactly.
                let entries = max_entries / count + u64::from(i < max_entries % count);
                let bytes = max_bytes / count + u64::from(i < max_bytes % count);
                Mutex::new(Shard::new(entries, bytes))
            })
            .collect();
        Self {
            shards,
            shard_hasher: RandomState::new(),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The most recently stored variant of `key` that matches the request, marked as used.
    pub(super) fn get(
        &self,
        key: &PrimaryKey,
        request_headers: &HeaderMap,
    ) -> Option<Arc<CachedEntry>> {
        let mut shard = self.shard(key);
        let found = shard.index.get(key)?.iter().rev().copied().find(|&i| {
            shard
                .node(i)
                .is_some_and(|node| node.entry.matches(request_headers))
        })?;
        shard.touch(found);
        shard.node(found).map(|node| node.entry.clone())
    }

    /// Stores `entry`, replacing the stored variant with the same key and variant values, and
    /// evicting least recently used entries of the shard until it fits. Returns `false` (and
    /// stores nothing) if the entry alone exceeds the shard's byte share.
    pub(super) fn insert(&self, entry: Arc<CachedEntry>) -> bool {
        let mut shard = self.shard(&entry.key);
        if entry.charge > shard.max_bytes {
            return false;
        }
        let (mut removed, mut removed_bytes, mut evicted) = (0, 0, 0);
        let same: Vec<usize> = shard
            .index
            .get(&*entry.key)
            .map(|variants| {
                let mut same: Vec<usize> = variants
                    .iter()
                    .copied()
                    .filter(|&i| {
                        shard
                            .node(i)
                            .is_some_and(|node| node.entry.variant == entry.variant)
                    })
                    .collect();
                if same.is_empty() && variants.len() >= MAX_VARIANTS {
                    // The oldest variant makes room.
                    same.extend(variants.first().copied());
                }
                same
            })
            .unwrap_or_default();
        for i in same {
            if let Some(old) = shard.remove(i) {
                removed += 1;
                removed_bytes += old.charge;
            }
        }
        while shard.len >= shard.max_entries || shard.bytes + entry.charge > shard.max_bytes {
            let tail = shard.tail;
            let Some(old) = shard.remove(tail) else { break };
            removed += 1;
            removed_bytes += old.charge;
            evicted += 1;
        }
        let charge = entry.charge;
        shard.insert(entry);
        // Counted under the shard lock, so a concurrent removal of this very entry cannot be
        // counted first and wrap the totals below zero.
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        self.bytes.fetch_add(charge, Ordering::Relaxed);
        self.bytes.fetch_sub(removed_bytes, Ordering::Relaxed);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        drop(shard);
        true
    }

    /// Removes `entry` itself (not a newer replacement of it); whether it was present.
    pub(super) fn remove_entry(&self, entry: &Arc<CachedEntry>) -> bool {
        let mut shard = self.shard(&entry.key);
        let found = shard.index.get(&*entry.key).and_then(|variants| {
            variants.iter().copied().find(|&i| {
                shard
                    .node(i)
                    .is_some_and(|node| Arc::ptr_eq(&node.entry, entry))
            })
        });
        let removed = found.and_then(|i| shard.remove(i));
        self.account_removed(removed.iter().map(|e| e.charge))
    }

    /// Removes every variant of `key`; how many there were.
    pub(super) fn remove_key(&self, key: &PrimaryKey) -> u64 {
        let mut shard = self.shard(key);
        let variants = shard.index.get(key).cloned().unwrap_or_default();
        let removed: Vec<u64> = variants
            .into_iter()
            .filter_map(|i| shard.remove(i).map(|e| e.charge))
            .collect();
        let count = removed.len() as u64;
        self.account_removed(removed.into_iter());
        count
    }

    /// Subtracts removed entries from the totals; call it with the shard still locked.
    fn account_removed(&self, charges: impl Iterator<Item = u64>) -> bool {
        let (mut count, mut bytes) = (0, 0);
        for charge in charges {
            count += 1;
            bytes += charge;
        }
        self.entries.fetch_sub(count, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        count > 0
    }

    fn shard(&self, key: &PrimaryKey) -> MutexGuard<'_, Shard> {
        let hash = self.shard_hasher.hash_one(key);
        // The remainder is below the shard count, a usize.
        let i = (hash % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }

    #[cfg(test)]
    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

impl Shard {
    fn new(max_entries: u64, max_bytes: u64) -> Self {
        Self {
            index: HashMap::new(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    fn node(&self, i: usize) -> Option<&Node> {
        self.nodes.get(i).and_then(Option::as_ref)
    }

    fn insert(&mut self, entry: Arc<CachedEntry>) {
        let key = entry.key.clone();
        self.len += 1;
        self.bytes += entry.charge;
        let node = Some(Node {
            entry,
            prev: NIL,
            next: NIL,
        });
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.index.entry(key).or_default().push(i);
        self.push_front(i);
    }

    /// Unlinks and frees node `i`, returning its entry; `None` if `i` is not a live node.
    fn remove(&mut self, i: usize) -> Option<Arc<CachedEntry>> {
        self.node(i)?;
        self.unlink(i);
        let node = self.nodes.get_mut(i)?.take()?;
        self.free.push(i);
        self.len -= 1;
        self.bytes -= node.entry.charge;
        if let Some(variants) = self.index.get_mut(&*node.entry.key) {
            variants.retain(|&v| v != i);
            if variants.is_empty() {
                self.index.remove(&*node.entry.key);
            }
        }
        Some(node.entry)
    }

    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn links(&self, i: usize) -> (usize, usize) {
        self.node(i).map_or((NIL, NIL), |n| (n.prev, n.next))
    }

    fn set_prev(&mut self, i: usize, prev: usize) {
        if let Some(Some(node)) = self.nodes.get_mut(i) {
            node.prev = prev;
        }
    }

    fn set_next(&mut self, i: usize, next: usize) {
        if let Some(Some(node)) = self.nodes.get_mut(i) {
            node.next = next;
        }
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = self.links(i);
        if prev == NIL {
            self.head = next;
        } else {
            self.set_next(prev, next);
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.set_prev(next, prev);
        }
    }

    fn push_front(&mut self, i: usize) {
        let head = self.head;
        self.set_prev(i, NIL);
        self.set_next(i, head);
        if head == NIL {
            self.tail = i;
        } else {
            self.set_prev(head, i);
        }
        self.head = i;
    }
}

#[cfg(test)]
impl Store {
    /// Walks every shard and checks its list, index and totals against each other and the
    /// bounds; returns the entry count.
    pub(super) fn assert_consistent(&self) -> u64 {
        let (mut entries, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            let (mut prev, mut i, mut walked, mut charged) = (NIL, shard.head, 0, 0);
            while i != NIL {
                let node = shard.node(i).expect("listed nodes are live");
                assert_eq!(node.prev, prev, "broken back link");
                assert!(
                    shard
                        .index
                        .get(&*node.entry.key)
                        .is_some_and(|v| v.contains(&i)),
                    "every listed node is indexed"
                );
                charged += node.entry.charge;
                (prev, i) = (i, node.next);
                walked += 1;
            }
            assert_eq!(shard.tail, prev, "tail is the last node");
            assert_eq!(walked, shard.len, "every entry is on the list once");
            assert_eq!(
                shard.index.values().map(|v| v.len() as u64).sum::<u64>(),
                shard.len
            );
            assert_eq!(charged, shard.bytes);
            assert!(shard.len <= shard.max_entries && shard.bytes <= shard.max_bytes);
            entries += walked;
            bytes += charged;
        }
        assert_eq!(self.entries.load(Ordering::Relaxed), entries);
        assert_eq!(self.bytes.load(Ordering::Relaxed), bytes);
        entries
    }
}

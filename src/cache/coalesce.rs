//! Request coalescing: concurrent misses for one key make one backend request, whose outcome
//! the others wait for.

use crate::sync::lock;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::CacheKey;
use super::entry::CachedEntry;

const SHARDS: usize = 16;

/// What [`Cache::join_or_lead`](super::Cache::join_or_lead) made of the caller.
#[derive(Debug)]
pub enum Coalesce {
    /// Nobody is fetching this key: the caller does, and reports the outcome through the
    /// guard (dropping it counts as [`LeaderResult::Abandoned`]).
    Leader(LeaderGuard),
    /// Another request is fetching this key: await its outcome.
    Follower(Follower),
}

/// How a leader's fetch ended, as seen by its followers.
#[derive(Clone, Debug)]
pub enum LeaderResult {
    /// The response was stored. It may still not suit a follower (another `Vary` variant, an
    /// `Authorization` it cannot be shared with): check with
    /// [`Cache::respond_from`](super::Cache::respond_from).
    Stored(Arc<CachedEntry>),
    /// The response was not storable: each follower goes to the backend itself.
    NotStored,
    /// The leader gave up (its request failed or was cancelled): each follower goes to the
    /// backend itself.
    Abandoned,
}

/// The right and duty to fetch a key for everyone waiting on it. Report with
/// [`stored`](Self::stored) or [`not_stored`](Self::not_stored); dropping the guard releases
/// the followers with [`LeaderResult::Abandoned`].
pub struct LeaderGuard {
    table: Arc<Inflight>,
    key: CacheKey,
    id: u64,
    sender: watch::Sender<Option<LeaderResult>>,
    settled: bool,
}

/// A future that resolves to the leader's [`LeaderResult`]. Cancel-safe: dropping it only stops
/// waiting.
pub struct Follower {
    result: BoxFuture<'static, LeaderResult>,
}

/// The keys being fetched, each with the channel its followers listen on.
pub(super) struct Inflight {
    shards: Box<[Mutex<HashMap<CacheKey, Fetch>>]>,
    shard_hasher: RandomState,
    next_id: AtomicU64,
}

struct Fetch {
    /// Tells this fetch from a later one for the same key, so a late guard drop cannot end it.
    id: u64,
    sender: watch::Sender<Option<LeaderResult>>,
}

impl Inflight {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_hasher: RandomState::new(),
            next_id: AtomicU64::new(0),
        }
    }

    pub(super) fn join_or_lead(self: &Arc<Self>, key: &CacheKey) -> Coalesce {
        let mut shard = self.shard(key);
        if let Some(fetch) = shard.get(key) {
            let mut receiver = fetch.sender.subscribe();
            drop(shard);
            return Coalesce::Follower(Follower {
                result: Box::pin(async move {
                    loop {
                        if let Some(result) = receiver.borrow_and_update().clone() {
                            return result;
                        }
                        if receiver.changed().await.is_err() {
                            return receiver.borrow().clone().unwrap_or(LeaderResult::Abandoned);
                        }
                    }
                }),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, _) = watch::channel(None);
        shard.insert(
            key.clone(),
            Fetch {
                id,
                sender: sender.clone(),
            },
        );
        drop(shard);
        Coalesce::Leader(LeaderGuard {
            table: self.clone(),
            key: key.clone(),
            id,
            sender,
            settled: false,
        })
    }

    /// Keys currently being fetched.
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, HashMap<CacheKey, Fetch>> {
        let hash = self.shard_hasher.hash_one(key);
        // The remainder is below the shard count, a usize.
        let i = (hash % self.shards.len() as u64) as usize;
        lock(&self.shards[i])
    }
}

impl LeaderGuard {
    /// The response was stored as `entry`: followers receive it.
    pub fn stored(mut self, entry: Arc<CachedEntry>) {
        self.settle(LeaderResult::Stored(entry));
    }

    /// The response was not stored: followers go to the backend themselves.
    pub fn not_stored(mut self) {
        self.settle(LeaderResult::NotStored);
    }

    /// The key this guard leads.
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    fn settle(&mut self, result: LeaderResult) {
        if self.settled {
            return;
        }
        self.settled = true;
        // Unregister first: a request arriving from now on leads a new fetch (and, if this one
        // stored its entry, finds it by looking up the cache first).
        let mut shard = self.table.shard(&self.key);
        if shard
            .get(&self.key)
            .is_some_and(|fetch| fetch.id == self.id)
        {
            shard.remove(&self.key);
        }
        drop(shard);
        self.sender.send_replace(Some(result));
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.settle(LeaderResult::Abandoned);
    }
}

impl fmt::Debug for LeaderGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderGuard")
            .field("key", &self.key)
            .field("followers", &self.sender.receiver_count())
            .finish_non_exhaustive()
    }
}

impl Future for Follower {
    type Output = LeaderResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LeaderResult> {
        self.result.as_mut().poll(cx)
    }
}

impl fmt::Debug for Follower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower").finish_non_exhaustive()
    }
}

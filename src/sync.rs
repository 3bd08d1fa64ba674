//! Small synchronisation helpers shared by the rooms that keep state across snapshots.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Locks `mutex`, carrying on after a panic elsewhere poisoned it: every guarded value here is
/// valid after any partial update (maps of weak references, pools, counters).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The live value for `key`, or a new one from `make`. The map holds only weak references, so
/// a value lives exactly as long as some snapshot uses it; dead entries are dropped on insert.
pub(crate) fn try_shared_entry<K: Eq + Hash, V, E>(
    map: &Mutex<HashMap<K, Weak<V>>>,
    key: K,
    make: impl FnOnce() -> Result<V, E>,
) -> Result<Arc<V>, E> {
    let mut map = lock(map);
    if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(existing);
    }
    let value = Arc::new(make()?);
    map.retain(|_, weak| weak.strong_count() > 0);
    map.insert(key, Arc::downgrade(&value));
    Ok(value)
}

/// [`try_shared_entry`] for values whose construction cannot fail.
pub(crate) fn shared_entry<K: Eq + Hash, V>(
    map: &Mutex<HashMap<K, Weak<V>>>,
    key: K,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    match try_shared_entry(map, key, || Ok::<V, std::convert::Infallible>(make())) {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

/// Adds one to `counter` unless it already reached `max`; true when it did.
pub(crate) fn try_increment_below(counter: &std::sync::atomic::AtomicU32, max: u32) -> bool {
    use std::sync::atomic::Ordering;
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

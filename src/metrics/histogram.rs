//! A Prometheus histogram family whose observations cost no atomic read-modify-write.
//!
//! The `prometheus` crate's histogram takes four locked atomic operations per observation (a
//! hot/cold shard switch, the bucket, the count and a compare-and-swap loop on the sum). On a
//! proxy's request path, where two histograms are observed per request, those eight operations
//! were among the costliest instructions left: a locked operation waits for the store buffer to
//! drain, and in profiles the instruction after each one collects a large share of the samples.
//!
//! Here each thread that observes gets a shard of its own (the first [`OWNED_SHARDS`] threads
//! to observe anything; later ones share one last shard and pay the atomic operations). A
//! shard has a single writer, so an observation is a plain load and store of two counters; a
//! scrape sums the shards. The count is the sum of the buckets (one of them past the last
//! bound), so it always equals the `+Inf` bucket; the sum may trail an observation being
//! written at that instant by that one observation.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

/// Shards owned by one thread each; one more is shared by any further threads.
const OWNED_SHARDS: usize = 16;
/// The shared shard's index.
const SHARED_SHARD: usize = OWNED_SHARDS;

/// Hands out owned shard indices, in the order threads first observe.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard index; `usize::MAX` until the thread first observes.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's shard: its own while owned shards last, else the shared one.
fn shard_index() -> usize {
    SHARD.with(|shard| {
        let index = shard.get();
        if index != usize::MAX {
            return index;
        }
        let next = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
        let index = if next < OWNED_SHARDS {
            next
        } else {
            SHARED_SHARD
        };
        shard.set(index);
        index
    })
}

/// One cache line of counters: shards never share a line, so threads writing their own do
/// not take each other's lines away.
#[repr(align(64))]
struct Line([AtomicU64; 8]);

/// One histogram (one label set) of a [`HistogramFamily`].
pub struct ShardedHistogram {
    bounds: Arc<[f64]>,
    /// Per shard, `lines_per_shard` lines holding a count per bucket (one per bound, one past
    /// the last) and then the sum's bits.
    lines: Box<[Line]>,
    lines_per_shard: usize,
}

impl ShardedHistogram {
    fn new(bounds: Arc<[f64]>) -> Self {
        let lines_per_shard = (bounds.len() + 2).div_ceil(8);
        Self {
            lines: (0..(OWNED_SHARDS + 1) * lines_per_shard)
                .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            lines_per_shard,
            bounds,
        }
    }

    /// Word `word` of shard `shard` (buckets first, then the sum).
    fn word(&self, shard: usize, word: usize) -> &AtomicU64 {
        &self.lines[shard * self.lines_per_shard + word / 8].0[word % 8]
    }

    /// Records one value (seconds, for latencies).
    pub fn observe(&self, value: f64) {
        // The first bound the value does not exceed; past the last, the overflow bucket.
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        let shard = shard_index();
        let count = self.word(shard, bucket);
        // 0.0's bits are all zero, so a zeroed word is a zero sum.
        let sum = self.word(shard, self.bounds.len() + 1);
        if shard == SHARED_SHARD {
            count.fetch_add(1, Ordering::Relaxed);
            let _ = sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        } else {
            // This thread is the shard's only writer: a load and a store cannot lose an update.
            count.store(count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            let total = f64::from_bits(sum.load(Ordering::Relaxed)) + value;
            sum.store(total.to_bits(), Ordering::Relaxed);
        }
    }

    /// Cumulative bucket counts (the last one is the total count) and the sum, over all shards.
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let buckets = self.bounds.len() + 1;
        let mut counts = vec![0u64; buckets];
        let mut sum = 0.0;
        for shard in 0..=OWNED_SHARDS {
            for (bucket, total) in counts.iter_mut().enumerate() {
                *total += self.word(shard, bucket).load(Ordering::Relaxed);
            }
            sum += f64::from_bits(self.word(shard, buckets).load(Ordering::Relaxed));
        }
        let mut running = 0;
        for count in &mut counts {
            running += *count;
            *count = running;
        }
        (counts, sum)
    }
}

/// A histogram family with labels, collected by a `prometheus` registry like the crate's own
/// `HistogramVec` (same exposition), observed through [`ShardedHistogram`] handles.
#[derive(Clone)]
pub struct HistogramFamily {
    inner: Arc<FamilyInner>,
}

struct FamilyInner {
    desc: Desc,
    bounds: Arc<[f64]>,
    children: Mutex<HashMap<Vec<String>, Arc<ShardedHistogram>>>,
}

impl HistogramFamily {
    /// A family `name` with `help`, the given label names and bucket upper bounds (ascending).
    pub fn new(
        name: &str,
        help: &str,
        labels: &[&str],
        bounds: &[f64],
    ) -> prometheus::Result<Self> {
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
            HashMap::new(),
        )?;
        Ok(Self {
            inner: Arc::new(FamilyInner {
                desc,
                bounds: bounds.into(),
                children: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The histogram for these label values (one per label name, in order), made on first use.
    pub fn with_label_values(&self, values: &[&str]) -> Arc<ShardedHistogram> {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let mut children = crate::sync::lock(&self.inner.children);
        Arc::clone(
            children
                .entry(key)
                .or_insert_with(|| Arc::new(ShardedHistogram::new(Arc::clone(&self.inner.bounds)))),
        )
    }
}

impl Collector for HistogramFamily {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let desc = &self.inner.desc;
        let children = crate::sync::lock(&self.inner.children);
        if children.is_empty() {
            return Vec::new();
        }
        let mut metrics: Vec<Metric> = children
            .iter()
            .map(|(values, histogram)| {
                let (cumulative, sum) = histogram.snapshot();
                let buckets = self
                    .inner
                    .bounds
                    .iter()
                    .zip(&cumulative)
                    .map(|(bound, count)| {
                        let mut bucket = Bucket::default();
                        bucket.set_upper_bound(*bound);
                        bucket.set_cumulative_count(*count);
                        bucket
                    })
                    .collect();
                let mut proto = Histogram::default();
                proto.set_bucket(buckets);
                proto.set_sample_count(cumulative.last().copied().unwrap_or(0));
                proto.set_sample_sum(sum);
                // By label name, as the crate orders them.
                let mut labels: Vec<LabelPair> = desc
                    .variable_labels
                    .iter()
                    .zip(values)
                    .map(|(name, value)| {
                        let mut pair = LabelPair::default();
                        pair.set_name(name.clone());
                        pair.set_value(value.clone());
                        pair
                    })
                    .collect();
                labels.sort_by(|a, b| a.name().cmp(b.name()));
                let mut metric = Metric::default();
                metric.set_label(labels);
                metric.set_histogram(proto);
                metric
            })
            .collect();
        // By label values (in label-name order), as the crate's own families are.
        metrics.sort_by(|a, b| {
            let key = |m: &Metric| {
                m.get_label()
                    .iter()
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>()
            };
            key(a).cmp(&key(b))
        });
        let mut family = MetricFamily::default();
        family.set_name(desc.fq_name.clone());
        family.set_help(desc.help.clone());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, HistogramOpts, HistogramVec, Registry, TextEncoder};

    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1, 1.0];

    fn exposition(collector: Box<dyn Collector>) -> String {
        let registry = Registry::new();
        registry.register(collector).unwrap();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The same observations give the same exposition as the `prometheus` crate's own
    /// histogram: names, labels, order, cumulative buckets, `+Inf`, sum and count.
    #[test]
    fn the_exposition_matches_the_prometheus_crates_histogram() {
        let ours = HistogramFamily::new("t_seconds", "Help text.", &["policy", "backend"], BOUNDS)
            .unwrap();
        let theirs = HistogramVec::new(
            HistogramOpts::new("t_seconds", "Help text.").buckets(BOUNDS.to_vec()),
            &["policy", "backend"],
        )
        .unwrap();
        let values = [0.0005, 0.001, 0.002, 0.05, 0.5, 1.0, 3.0, 0.0];
        for (labels, skip) in [(["p", "b"], 0), (["p", "a"], 3), (["q", "b"], 7)] {
            let mine = ours.with_label_values(&labels);
            let reference = theirs.with_label_values(&labels);
            for v in &values[skip..] {
                mine.observe(*v);
                reference.observe(*v);
            }
        }
        assert_eq!(exposition(Box::new(ours)), exposition(Box::new(theirs)));
    }

    /// Threads beyond the owned shards share the last one; no observation is lost either way.
    #[test]
    fn observations_from_many_threads_are_all_counted() {
        let family = HistogramFamily::new("m_seconds", "h", &["k"], BOUNDS).unwrap();
        let histogram = family.with_label_values(&["x"]);
        let threads = OWNED_SHARDS * 2;
        let per_thread = 5_000u64;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let histogram = &histogram;
                scope.spawn(move || {
                    for i in 0..per_thread {
                        // Values spread over every bucket, the overflow one included.
                        histogram.observe([0.0005, 0.005, 0.05, 0.5, 5.0][(i as usize + t) % 5]);
                    }
                });
            }
        });
        let (cumulative, sum) = histogram.snapshot();
        let total = threads as u64 * per_thread;
        assert_eq!(cumulative.last().copied(), Some(total));
        assert_eq!(cumulative[0], total / 5, "first bucket");
        assert_eq!(cumulative[3], total / 5 * 4, "all but the overflow bucket");
        let expected = (0.0005 + 0.005 + 0.05 + 0.5 + 5.0) * (total / 5) as f64;
        assert!(
            (sum - expected).abs() < 1e-6 * expected,
            "{sum} vs {expected}"
        );
    }

    #[test]
    fn a_family_without_observed_label_sets_exports_nothing() {
        let family = HistogramFamily::new("e_seconds", "h", &["k"], BOUNDS).unwrap();
        assert!(family.collect().is_empty());
        assert_eq!(exposition(Box::new(family)), "");
    }
}

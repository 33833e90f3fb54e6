//! Exact-replay memory: tool call id → the exact DSML block the model sampled, so that
//! when a client sends the call back as JSON history the prompt is re-rendered with the
//! sampled bytes and the engine's live session still matches (spec server.md §3.6).
//! Bounded LRU by id count and by accounted bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Per-entry bookkeeping overhead counted against the byte budget.
const ENTRY_OVERHEAD: usize = 64;

struct Inner {
    by_id: HashMap<String, (Arc<str>, u64)>,
    by_age: BTreeMap<u64, String>,
    clock: u64,
    bytes: usize,
}

/// Thread-safe bounded LRU map.
pub struct ToolMemory {
    inner: Mutex<Inner>,
    max_ids: usize,
    max_bytes: usize,
}

impl ToolMemory {
    pub fn new(max_ids: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                by_age: BTreeMap::new(),
                clock: 0,
                bytes: 0,
            }),
            max_ids,
            max_bytes,
        }
    }

    fn cost(id: &str, block: &str) -> usize {
        id.len() + block.len() + ENTRY_OVERHEAD
    }

    /// Remember that every id in `ids` was sampled as part of `block`.
    pub fn remember(&self, ids: &[String], block: &str) {
        let block: Arc<str> = Arc::from(block);
        let Ok(mut g) = self.inner.lock() else { return };
        for id in ids {
            g.clock += 1;
            let stamp = g.clock;
            if let Some((old, old_stamp)) = g.by_id.insert(id.clone(), (Arc::clone(&block), stamp))
            {
                g.by_age.remove(&old_stamp);
                g.bytes = g.bytes.saturating_sub(Self::cost(id, &old));
            }
            g.by_age.insert(stamp, id.clone());
            g.bytes += Self::cost(id, &block);
        }
        while g.by_id.len() > self.max_ids || g.bytes > self.max_bytes {
            let Some((_, oldest)) = g.by_age.pop_first() else {
                break;
            };
            if let Some((b, _)) = g.by_id.remove(&oldest) {
                g.bytes = g.bytes.saturating_sub(Self::cost(&oldest, &b));
            }
        }
    }

    /// The block of `id`, refreshing its recency.
    pub fn lookup(&self, id: &str) -> Option<Arc<str>> {
        let Ok(mut g) = self.inner.lock() else {
            return None;
        };
        g.clock += 1;
        let stamp = g.clock;
        let (block, old) = {
            let entry = g.by_id.get_mut(id)?;
            let old = std::mem::replace(&mut entry.1, stamp);
            (Arc::clone(&entry.0), old)
        };
        g.by_age.remove(&old);
        g.by_age.insert(stamp, id.to_string());
        Some(block)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.by_id.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn remembers_refreshes_and_evicts_least_recent() {
        let m = ToolMemory::new(3, usize::MAX);
        m.remember(&["a".into(), "b".into()], "B1");
        m.remember(&["c".into()], "B2");
        assert_eq!(m.lookup("a").as_deref(), Some("B1")); // a is now most recent
        m.remember(&["d".into()], "B3"); // evicts b (least recent)
        assert!(m.lookup("b").is_none());
        assert_eq!(m.lookup("a").as_deref(), Some("B1"));
        assert_eq!(m.lookup("c").as_deref(), Some("B2"));
        assert_eq!(m.len(), 3);
        m.remember(&["c".into()], "B4"); // replace
        assert_eq!(m.lookup("c").as_deref(), Some("B4"));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn byte_budget_bounds_memory() {
        let m = ToolMemory::new(1000, 3 * (1 + 100 + ENTRY_OVERHEAD));
        for i in 0..10 {
            m.remember(&[format!("{i}")], &"x".repeat(100));
        }
        assert_eq!(m.len(), 3);
        assert!(m.lookup("9").is_some() && m.lookup("6").is_none());
    }
}

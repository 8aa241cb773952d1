//! Decoded chunks (or other values by chunk id) kept in memory, bounded by
//! bytes, evicted oldest first: the read-ahead of instant restore, the recently
//! stored chunks an incremental compares its changed regions against, and the
//! chunk lists `Repository::load_list_parts` resolved.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::crypto::ChunkId;

/// Values by chunk id, at most `budget` bytes of them as `weigh` counts.
pub(crate) struct Fifo<V> {
    map: HashMap<ChunkId, Arc<V>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
    budget: usize,
    weigh: fn(&V) -> usize,
}

/// Decoded chunks.
pub(crate) type ChunkCache = Fifo<Vec<u8>>;

impl ChunkCache {
    pub(crate) fn new(budget: usize) -> Self {
        Fifo::weighed(budget, Vec::len)
    }
}

impl<V> Fifo<V> {
    pub(crate) fn weighed(budget: usize, weigh: fn(&V) -> usize) -> Self {
        Fifo {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
            weigh,
        }
    }

    pub(crate) fn get(&self, id: &ChunkId) -> Option<Arc<V>> {
        self.map.get(id).cloned()
    }

    pub(crate) fn insert(&mut self, id: ChunkId, data: Arc<V>) {
        if self.budget == 0 || self.map.contains_key(&id) {
            return;
        }
        self.bytes += (self.weigh)(&data);
        self.map.insert(id, data);
        self.order.push_back(id);
        while self.bytes > self.budget
            && let Some(old) = self.order.pop_front()
        {
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= (self.weigh)(&d);
            }
        }
    }
}

impl<V> std::fmt::Debug for Fifo<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fifo")
            .field("chunks", &self.map.len())
            .field("bytes", &self.bytes)
            .field("budget", &self.budget)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_chunks_go_first_and_the_budget_holds() {
        let mut c = ChunkCache::new(3 * 1024);
        for i in 0..5u8 {
            c.insert(ChunkId([i; 32]), Arc::new(vec![i; 1024]));
        }
        assert!(c.bytes <= 3 * 1024);
        assert!(c.get(&ChunkId([0; 32])).is_none());
        assert_eq!(c.get(&ChunkId([4; 32])).unwrap()[0], 4);
        let mut off = ChunkCache::new(0);
        off.insert(ChunkId([1; 32]), Arc::new(vec![1]));
        assert!(off.get(&ChunkId([1; 32])).is_none());
    }
}

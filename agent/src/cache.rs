//! Decoded chunks kept in memory, bounded by bytes, evicted oldest first: the
//! read-ahead of instant restore, and the recently stored chunks an incremental
//! compares its changed regions against.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::crypto::ChunkId;

pub(crate) struct ChunkCache {
    map: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
    bytes: usize,
    budget: usize,
}

impl ChunkCache {
    pub(crate) fn new(budget: usize) -> Self {
        ChunkCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    pub(crate) fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.map.get(id).cloned()
    }

    pub(crate) fn insert(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        if self.budget == 0 || self.map.contains_key(&id) {
            return;
        }
        self.bytes += data.len();
        self.map.insert(id, data);
        self.order.push_back(id);
        while self.bytes > self.budget
            && let Some(old) = self.order.pop_front()
        {
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
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

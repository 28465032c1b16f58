//! Free-space accounting for the data file (in blocks) and the metadata file (in pages).
//!
//! The allocator lives in memory only: at open it is rebuilt from what the extent maps and
//! commits reference (see FORMAT.md, "space"), so it can never disagree with them on disk.
//! Space freed while running becomes reusable only after the next durable sync (until then the
//! durable state may still reference it) and after every I/O that could still touch it ended.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct SpaceAllocator {
    /// Free runs inside `[first, end)`: start -> length.
    free: BTreeMap<u64, u64>,
    /// Units below `first` are reserved (file headers).
    first: u64,
    /// Every unit at or above `end` is free and has never been used.
    end: u64,
    used: u64,
    /// While a space scan runs: every unit handed out since it began.
    tracked: Option<roaring::RoaringTreemap>,
}

impl SpaceAllocator {
    pub fn new(first: u64) -> Self {
        SpaceAllocator {
            free: BTreeMap::new(),
            first,
            end: first,
            used: 0,
            tracked: None,
        }
    }

    /// Builds the allocator from the set of used units.
    pub fn from_used(first: u64, used: &roaring::RoaringTreemap) -> Self {
        let mut alloc = SpaceAllocator::new(first);
        let mut next = first;
        for unit in used.iter().filter(|&u| u >= first) {
            if unit > next {
                alloc.free.insert(next, unit - next);
            }
            next = unit + 1;
            alloc.used += 1;
        }
        alloc.end = next;
        alloc
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    /// Units inside the file that are free: everything below the end not in use (O(1)).
    pub fn free_inside(&self) -> u64 {
        self.end - self.first - self.used
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// Takes a run of at most `want` units (at least one), reusing freed space first.
    pub fn alloc(&mut self, want: u64) -> (u64, u64) {
        debug_assert!(want > 0);
        if let Some((&start, &len)) = self.free.iter().next() {
            self.free.remove(&start);
            let take = len.min(want);
            if take < len {
                self.free.insert(start + take, len - take);
            }
            self.used += take;
            self.track(start, take);
            return (start, take);
        }
        let start = self.end;
        self.end += want;
        self.used += want;
        self.track(start, want);
        (start, want)
    }

    fn track(&mut self, start: u64, len: u64) {
        if let Some(tracked) = &mut self.tracked {
            tracked.insert_range(start..start + len);
        }
    }

    /// Starts recording every unit handed out (for a space scan).
    pub fn start_tracking(&mut self) {
        self.tracked = Some(roaring::RoaringTreemap::new());
    }

    pub fn stop_tracking(&mut self) {
        self.tracked = None;
    }

    /// Units handed out since tracking started (empty when not tracking).
    pub fn tracked(&self) -> roaring::RoaringTreemap {
        self.tracked.clone().unwrap_or_default()
    }

    /// Every unit in use.
    pub fn used_set(&self) -> roaring::RoaringTreemap {
        let mut used = roaring::RoaringTreemap::new();
        used.insert_range(self.first..self.end);
        for (&start, &len) in &self.free {
            used.remove_range(start..start + len);
        }
        used
    }

    /// Takes `n` contiguous units.
    pub fn alloc_contiguous(&mut self, n: u64) -> u64 {
        let found = self
            .free
            .iter()
            .find(|(_, &len)| len >= n)
            .map(|(&s, &l)| (s, l));
        self.used += n;
        let start = match found {
            Some((start, len)) => {
                self.free.remove(&start);
                if len > n {
                    self.free.insert(start + n, len - n);
                }
                start
            }
            None => {
                let start = self.end;
                self.end += n;
                start
            }
        };
        self.track(start, n);
        start
    }

    /// Returns a run; neighbouring free runs are merged.
    pub fn free(&mut self, mut start: u64, mut len: u64) {
        debug_assert!(
            start >= self.first && start + len <= self.end,
            "freeing {start}+{len} outside the file"
        );
        self.used -= len;
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
            if prev + prev_len == start {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        if start + len == self.end {
            self.end = start;
        } else {
            self.free.insert(start, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merge() {
        let mut a = SpaceAllocator::new(1);
        assert_eq!(a.alloc(4), (1, 4));
        assert_eq!(a.alloc(4), (5, 4));
        a.free(1, 2);
        assert_eq!(a.alloc(8), (1, 2));
        assert_eq!(a.free_inside(), a.free.values().sum::<u64>());
        a.free(5, 4);
        assert_eq!(a.end(), 5);
        assert_eq!(a.free_inside(), a.free.values().sum::<u64>());
        a.free(1, 2);
        a.free(3, 2);
        assert_eq!(a.end(), 1);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn from_used_finds_gaps() {
        let used: roaring::RoaringTreemap = [1u64, 2, 5, 9].into_iter().collect();
        let mut a = SpaceAllocator::from_used(1, &used);
        assert_eq!(a.used(), 4);
        assert_eq!(a.end(), 10);
        assert_eq!(a.free_inside(), 5);
        assert_eq!(a.free_inside(), a.free.values().sum::<u64>());
        assert_eq!(a.alloc_contiguous(3), 6);
        assert_eq!(a.alloc(10), (3, 2));
    }
}

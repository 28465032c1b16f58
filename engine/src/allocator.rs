//! Free-space accounting for the data file (in blocks) and the metadata file (in pages).
//!
//! The allocator lives in memory only: at open it is rebuilt from what the extent maps and
//! commits reference (see FORMAT.md, "space"), so it can never disagree with them on disk.
//! Space freed while running becomes reusable only after the next durable sync (until then the
//! durable state may still reference it) and after every I/O that could still touch it ended.

use std::collections::{BTreeMap, BTreeSet};

/// Requests of this many units or more are worth placing whole (`Fit::Whole`): scattered frees
/// leave runs of a unit or two, and a large write given those would go out as that many small
/// writes. Smaller requests take the first free run, which is how such fragments are used up.
/// (Data blocks: 64 KiB.)
pub const CONTIGUOUS_MIN: u64 = 16;

/// Where `SpaceAllocator::alloc` takes its run from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// The first free run, whatever its size, else past the end.
    First,
    /// The smallest free run that holds the whole request, else the largest free run of at
    /// least `CONTIGUOUS_MIN` units, else past the end: a large request in as few pieces as
    /// the free space allows, even if the file must grow for it.
    Whole,
}

impl Fit {
    /// `Whole` for a request of `CONTIGUOUS_MIN` units or more (decide once per request: what
    /// is left of it after a first piece may be smaller), else `First`.
    pub fn for_request(units: u64) -> Fit {
        if units >= CONTIGUOUS_MIN {
            Fit::Whole
        } else {
            Fit::First
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct SpaceAllocator {
    /// Free runs inside `[first, end)`: start -> length.
    free: BTreeMap<u64, u64>,
    /// The same runs by size: (length, start).
    by_size: BTreeSet<(u64, u64)>,
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
            by_size: BTreeSet::new(),
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
                alloc.insert_run(next, unit - next);
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

    /// Takes a run of at most `want` units (at least one), reusing freed space first, from
    /// where `fit` says.
    pub fn alloc(&mut self, want: u64, fit: Fit) -> (u64, u64) {
        debug_assert!(want > 0);
        let found = match fit {
            Fit::First => self
                .free
                .first_key_value()
                .map(|(&start, &len)| (len, start)),
            Fit::Whole => {
                let holds = self.by_size.range((want, 0)..).next();
                let largest = self
                    .by_size
                    .last()
                    .filter(|&&(len, _)| len >= CONTIGUOUS_MIN);
                holds.or(largest).copied()
            }
        };
        match found {
            Some((len, start)) => self.take(start, len, want),
            None => self.take_end(want),
        }
    }

    /// Takes `want` units in as few runs as `fit` gives, calling `each(start, len)` for each
    /// in order.
    pub fn alloc_all(&mut self, mut want: u64, fit: Fit, mut each: impl FnMut(u64, u64)) {
        while want > 0 {
            let (start, len) = self.alloc(want, fit);
            each(start, len);
            want -= len;
        }
    }

    /// Takes at most `want` units from the start of the free run `start`, `len` long.
    fn take(&mut self, start: u64, len: u64, want: u64) -> (u64, u64) {
        self.remove_run(start, len);
        let take = len.min(want);
        if take < len {
            self.insert_run(start + take, len - take);
        }
        self.used += take;
        self.track(start, take);
        (start, take)
    }

    /// Takes `want` units past the end.
    fn take_end(&mut self, want: u64) -> (u64, u64) {
        let start = self.end;
        self.end += want;
        self.used += want;
        self.track(start, want);
        (start, want)
    }

    fn insert_run(&mut self, start: u64, len: u64) {
        self.free.insert(start, len);
        self.by_size.insert((len, start));
    }

    fn remove_run(&mut self, start: u64, len: u64) {
        self.free.remove(&start);
        self.by_size.remove(&(len, start));
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

    /// Takes `n` contiguous units: from the smallest free run that holds them, else past the
    /// end.
    pub fn alloc_contiguous(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        match self.by_size.range((n, 0)..).next().copied() {
            Some((len, start)) => self.take(start, len, n).0,
            None => self.take_end(n).0,
        }
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
                self.remove_run(prev, prev_len);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.remove_run(start + len, next_len);
            len += next_len;
        }
        if start + len == self.end {
            self.end = start;
        } else {
            self.insert_run(start, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An allocator whose free runs are `runs` (start, len), with used units between them.
    fn with_free_runs(runs: &[(u64, u64)], end: u64) -> SpaceAllocator {
        let mut used = roaring::RoaringTreemap::new();
        used.insert_range(1..end);
        for &(start, len) in runs {
            used.remove_range(start..start + len);
        }
        SpaceAllocator::from_used(1, &used)
    }

    /// The free runs are separate (never touching), below `end`, the size index holds exactly
    /// them, and the counts add up.
    fn check(a: &SpaceAllocator) {
        let mut last_end = None;
        for (&start, &len) in &a.free {
            assert!(len > 0 && start >= a.first);
            assert!(
                last_end.is_none_or(|end| start > end),
                "runs touch or overlap"
            );
            last_end = Some(start + len);
        }
        assert!(
            last_end.is_none_or(|end| end < a.end),
            "a free run reaches the end"
        );
        let by_size: BTreeSet<(u64, u64)> = a.free.iter().map(|(&s, &l)| (l, s)).collect();
        assert_eq!(a.by_size, by_size);
        assert_eq!(a.free_inside(), a.free.values().sum::<u64>());
    }

    #[test]
    fn large_requests_take_the_smallest_run_that_holds_them() {
        let mut a = with_free_runs(&[(10, 40), (100, 20), (200, 17), (300, 3)], 400);
        assert_eq!(a.alloc(17, Fit::Whole), (200, 17));
        assert_eq!(a.alloc(30, Fit::Whole), (10, 30));
        assert_eq!(a.alloc(16, Fit::Whole), (100, 16));
        assert_eq!(a.alloc_contiguous(10), 40);
        check(&a);
    }

    #[test]
    fn large_requests_take_the_largest_run_when_none_holds_them() {
        let mut a = with_free_runs(&[(10, 20), (100, 30), (200, 2)], 400);
        let mut runs = Vec::new();
        a.alloc_all(64, Fit::Whole, |start, len| runs.push((start, len)));
        // What is left after the two largest runs still goes where it fits whole.
        assert_eq!(runs, [(100, 30), (10, 20), (400, 14)]);
        check(&a);
    }

    #[test]
    fn large_requests_pass_over_fragments_and_small_ones_use_them_up() {
        let mut a = with_free_runs(&[(10, 1), (20, 15), (40, 2)], 400);
        assert_eq!(a.alloc(16, Fit::Whole), (400, 16));
        assert_eq!(a.alloc(256, Fit::Whole), (416, 256));
        assert_eq!(a.alloc(4, Fit::First), (10, 1));
        assert_eq!(a.alloc(4, Fit::First), (20, 4));
        assert_eq!(a.alloc(15, Fit::First), (24, 11));
        assert_eq!(a.alloc(15, Fit::First), (40, 2));
        // Where the file cannot grow, fragments serve a large request too.
        let mut b = with_free_runs(&[(10, 1), (20, 15)], 400);
        let mut runs = Vec::new();
        b.alloc_all(64, Fit::First, |start, len| runs.push((start, len)));
        assert_eq!(runs, [(10, 1), (20, 15), (400, 48)]);
        check(&a);
        check(&b);
    }

    fn none_held(owner: &roaring::RoaringTreemap, start: u64, len: u64) -> bool {
        let mut run = roaring::RoaringTreemap::new();
        run.insert_range(start..start + len);
        owner.is_disjoint(&run)
    }

    proptest! {
        /// Any mix of requests and returns keeps the runs and their size index in step, never
        /// hands out a unit twice, and gives every unit back.
        #[test]
        fn runs_and_their_size_index_stay_in_step(
            ops in prop::collection::vec((0u8..4, 1u64..80, any::<prop::sample::Index>()), 1..300)
        ) {
            let mut a = SpaceAllocator::new(1);
            let mut held: Vec<(u64, u64)> = Vec::new();
            let mut owner = roaring::RoaringTreemap::new();
            for (op, want, pick) in ops {
                match op {
                    0 => {
                        let fit = Fit::for_request(want);
                        let mut got = 0;
                        let mut ok = true;
                        a.alloc_all(want, fit, |start, len| {
                            ok &= len >= 1 && none_held(&owner, start, len);
                            owner.insert_range(start..start + len);
                            held.push((start, len));
                            got += len;
                        });
                        prop_assert!(ok, "a unit handed out twice");
                        prop_assert_eq!(got, want);
                    }
                    1 => {
                        let (start, len) = a.alloc(want, Fit::Whole);
                        prop_assert!(len >= 1 && len <= want);
                        prop_assert!(len == want || len >= CONTIGUOUS_MIN);
                        prop_assert!(none_held(&owner, start, len));
                        owner.insert_range(start..start + len);
                        held.push((start, len));
                    }
                    2 => {
                        let start = a.alloc_contiguous(want);
                        prop_assert!(none_held(&owner, start, want));
                        owner.insert_range(start..start + want);
                        held.push((start, want));
                    }
                    _ if !held.is_empty() => {
                        let (start, len) = held.swap_remove(pick.index(held.len()));
                        owner.remove_range(start..start + len);
                        a.free(start, len);
                    }
                    _ => {}
                }
                check(&a);
                prop_assert_eq!(a.used(), owner.len());
            }
            for (start, len) in held.drain(..) {
                a.free(start, len);
            }
            check(&a);
            prop_assert_eq!((a.used(), a.end()), (0, 1));
        }
    }

    #[test]
    fn alloc_free_merge() {
        let mut a = SpaceAllocator::new(1);
        assert_eq!(a.alloc(4, Fit::First), (1, 4));
        assert_eq!(a.alloc(4, Fit::First), (5, 4));
        a.free(1, 2);
        assert_eq!(a.alloc(8, Fit::First), (1, 2));
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
        assert_eq!(a.alloc(10, Fit::First), (3, 2));
    }
}

//! Allocation status of guest ranges (what `qemu-img map` and NBD's `base:allocation` and
//! `qemu:allocation-depth` report), with QEMU's meaning of each bit.

/// The status of a run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes in the run (never 0).
    pub length: u64,
    /// Backed by data of some layer (a data or compressed cluster, a raw file's data);
    /// `false` = a hole.
    pub data: bool,
    /// Known to read as zeroes (zero clusters, holes without a backing file).
    pub zero: bool,
    /// Layer of the backing chain that defines the run: 1 = this image, 2 = its backing
    /// file, …; 0 = no layer (reads as zeroes).
    pub depth: u32,
}

impl BlockStatus {
    /// Whether two runs have the same status (and may be merged).
    pub fn same_kind(&self, other: &BlockStatus) -> bool {
        (self.data, self.zero, self.depth) == (other.data, other.zero, other.depth)
    }
}

/// The most runs one status query returns; the caller asks again from where it ended.
pub const MAX_STATUS_RUNS: usize = 4096;

/// Appends a run, merging it into the last one when they have the same status.
pub fn push_status(runs: &mut Vec<BlockStatus>, run: BlockStatus) {
    if run.length == 0 {
        return;
    }
    match runs.last_mut() {
        Some(last) if last.same_kind(&run) => last.length += run.length,
        _ => runs.push(run),
    }
}

/// The runs of a layer seen through the layer above it: defined runs one level deeper.
pub fn deeper(runs: Vec<BlockStatus>) -> impl Iterator<Item = BlockStatus> {
    runs.into_iter().map(|mut r| {
        if r.depth > 0 {
            r.depth += 1;
        }
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(length: u64, data: bool, zero: bool, depth: u32) -> BlockStatus {
        BlockStatus {
            length,
            data,
            zero,
            depth,
        }
    }

    #[test]
    fn equal_neighbours_merge_and_empty_runs_vanish() {
        let mut v = Vec::new();
        push_status(&mut v, run(10, true, false, 1));
        push_status(&mut v, run(0, false, true, 0));
        push_status(&mut v, run(5, true, false, 1));
        push_status(&mut v, run(7, false, true, 1));
        assert_eq!(v, vec![run(15, true, false, 1), run(7, false, true, 1)]);
    }

    #[test]
    fn deeper_keeps_undefined_runs_at_depth_zero() {
        let v: Vec<_> = deeper(vec![run(1, true, false, 1), run(2, false, true, 0)]).collect();
        assert_eq!(v, vec![run(1, true, false, 2), run(2, false, true, 0)]);
    }
}

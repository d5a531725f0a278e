//! Changes gathered for one [`Bridge::send_batch`](bpftime_kernel_bridge::Bridge::send_batch)
//! call.

use std::ops::Range;

use bpftime_runtime::maps::RawChange;

/// Changes to send, gathered into one buffer.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) bytes: Vec<u8>,
    pub(crate) items: Vec<BatchItem>,
}

pub(crate) struct BatchItem {
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    pub(crate) key: Range<usize>,
    /// `None`: a delete.
    pub(crate) value: Option<Range<usize>>,
    /// A tombstone to free once its delete is queued.
    pub(crate) ack: bool,
}

/// Records sent per [`Bridge::send_batch`] call at most.
pub(crate) const BATCH: usize = 4096;

impl Batch {
    pub(crate) fn push(&mut self, c: &RawChange<'_>, ack: bool) {
        let k = self.bytes.len();
        self.bytes.extend_from_slice(c.key);
        let key = k..self.bytes.len();
        let value = c.value.map(|v| {
            let s = self.bytes.len();
            self.bytes.extend_from_slice(v);
            s..self.bytes.len()
        });
        self.items.push(BatchItem {
            slot: c.slot,
            generation: c.generation,
            key,
            value,
            ack,
        });
    }

    pub(crate) fn is_full(&self) -> bool {
        self.items.len() >= BATCH
    }
}

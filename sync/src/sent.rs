//! What the forwarder last sent the kernel, per element slot: the reference for deciding
//! whether a change needs sending and for sweeps.

use bpftime_runtime::maps::RawChange;

/// What the kernel was last sent, per element slot of one userspace map.
pub(crate) struct SentTable {
    key_len: usize,
    value_len: usize,
    /// Per slot: 0 unknown (never sent, or a send failed), 1 present, 2 deleted.
    state: Vec<u8>,
    generation: Vec<u32>,
    keys: Vec<u8>,
    values: Vec<u8>,
}

pub(crate) const UNKNOWN: u8 = 0;
pub(crate) const PRESENT: u8 = 1;
pub(crate) const DELETED: u8 = 2;

impl SentTable {
    pub(crate) fn new(key_len: usize, value_len: usize) -> Self {
        Self {
            key_len,
            value_len,
            state: Vec::new(),
            generation: Vec::new(),
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    pub(crate) fn grow(&mut self, slot: usize) {
        if slot >= self.state.len() {
            let n = (slot + 1).next_power_of_two().max(1024);
            self.state.resize(n, UNKNOWN);
            self.generation.resize(n, 0);
            self.keys.resize(n * self.key_len, 0);
            self.values.resize(n * self.value_len, 0);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.state.fill(UNKNOWN);
    }

    /// Whether the kernel needs this change: a live value it was not sent for this element,
    /// or the delete of an element whose value it was sent. A tombstone of an element the
    /// kernel never saw needs nothing: every earlier holder of the key sent its own delete
    /// before its element was freed (or the map asked for a resync).
    pub(crate) fn needs(&self, c: &RawChange<'_>) -> bool {
        let slot = c.slot as usize;
        let (state, generation) = match self.state.get(slot) {
            Some(&s) => (s, self.generation[slot]),
            None => (UNKNOWN, 0),
        };
        let same_element = state != UNKNOWN && generation == c.generation;
        match c.value {
            Some(v) => !(same_element && state == PRESENT && self.value(slot) == v),
            None => same_element && state == PRESENT,
        }
    }

    pub(crate) fn value(&self, slot: usize) -> &[u8] {
        &self.values[slot * self.value_len..(slot + 1) * self.value_len]
    }

    pub(crate) fn key(&self, slot: usize) -> &[u8] {
        &self.keys[slot * self.key_len..(slot + 1) * self.key_len]
    }

    /// Records that `c`'s state was sent.
    pub(crate) fn record(&mut self, c: &RawChange<'_>) {
        let slot = c.slot as usize;
        self.grow(slot);
        self.generation[slot] = c.generation;
        self.keys[slot * self.key_len..(slot + 1) * self.key_len].copy_from_slice(c.key);
        match c.value {
            Some(v) => {
                self.state[slot] = PRESENT;
                self.values[slot * self.value_len..(slot + 1) * self.value_len].copy_from_slice(v);
            }
            None => self.state[slot] = DELETED,
        }
    }

    /// The kernel refused what was sent for `slot`: its state is unknown again, so the next
    /// change of the slot is sent.
    pub(crate) fn forget(&mut self, slot: usize) {
        if let Some(s) = self.state.get_mut(slot) {
            *s = UNKNOWN;
        }
    }
}
